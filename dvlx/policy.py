"""Inference for robots: an exported VLA -> action chunks in robot units.

    policy = Policy.from_pretrained("runs/tiny_vla_flow_matching/default/export")
    chunk = policy.predict({"images": {"agentview": rgb, "robot0_eye_in_hand": wrist},
                            "proprio": state, "instruction": "lift the cube"})     # [H, A] float32

An observation is a mapping with `images` (camera name -> H x W x 3 uint8 array or PIL image, every camera of
the action spec), `proprio` ([S] floats, when the spec has proprio) and `instruction` (str). Images go through
the preprocessing used in training: resize to the spec's square size, and the centre crop of the same area
when training used random crops. Proprio is normalised and actions un-normalised with the statistics stored
in the export, so the caller works in robot units only.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from dvlx.backbone import DreamVL
from dvlx.config import ObjectiveConfig
from dvlx.export import ACTION_SPEC_FILE, EXPORT_MARKER, OBJECTIVE_FILE
from dvlx.objectives import objective_class
from dvlx.processing import IGNORE_INDEX, ImageProcessor, Tokenizer
from dvlx.processing.robot import ActionSpec, center_crop, encode_action_prompt, resize_image


class SpecMismatchError(ValueError):
    """An observation or a caller's expectation does not match the spec the checkpoint was trained with."""


class Policy:
    def __init__(
        self,
        backbone: DreamVL,
        objective,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        spec: ActionSpec,
        source: str = "",
    ) -> None:
        self.backbone = backbone.eval()
        self.objective = objective.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.spec = spec
        self.source = source

    @classmethod
    def from_pretrained(
        cls,
        export_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        expected_spec_fingerprint: str | None = None,
        allow_spec_mismatch: bool = False,
    ) -> Policy:
        """Loads an export written by `dvlx.fit` (VLA stage). With `expected_spec_fingerprint` (e.g. from the
        data a caller prepared), a different stored spec is refused unless `allow_spec_mismatch`."""
        folder = Path(export_dir)
        for name in (EXPORT_MARKER, ACTION_SPEC_FILE, OBJECTIVE_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing: not a complete dvlx VLA export")
        meta = json.loads((folder / EXPORT_MARKER).read_text())
        spec = ActionSpec.load(folder / ACTION_SPEC_FILE)
        if meta.get("action_spec_fingerprint") not in (None, spec.fingerprint()):
            raise SpecMismatchError(
                f"{folder / ACTION_SPEC_FILE}: fingerprint {spec.fingerprint()} differs from the recorded "
                f"at export ({meta['action_spec_fingerprint']}); the statistics were edited after training"
            )
        if (
            expected_spec_fingerprint is not None
            and expected_spec_fingerprint != spec.fingerprint()
            and not allow_spec_mismatch
        ):
            raise SpecMismatchError(
                f"{folder}: action spec fingerprint {spec.fingerprint()} differs from the expected "
                f"{expected_spec_fingerprint} (other statistics or dims); allow_spec_mismatch=True overrides"
            )
        tokenizer = Tokenizer.from_pretrained(folder)
        backbone = DreamVL.from_pretrained(folder, dtype=dtype, device=device)
        backbone.config.attention = meta.get("attention", backbone.config.attention)
        objective_cfg = ObjectiveConfig(**meta["objective"])
        objective = objective_class(objective_cfg.name)(
            spec, backbone.config.hidden_size, objective_cfg, tokenizer
        )
        objective.load_state_dict(load_file(str(folder / OBJECTIVE_FILE)))
        objective.to(device=device, dtype=dtype or torch.float32)
        return cls(backbone, objective, tokenizer, ImageProcessor.from_pretrained(folder), spec, str(folder))

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # --------------------------------------------------------------------------------- observations
    def _image(self, image) -> Image.Image:
        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
                raise SpecMismatchError(f"images must be H x W x 3 uint8, got {array.shape} {array.dtype}")
            image = Image.fromarray(array)
        image = resize_image(image.convert("RGB"), self.spec.image_size)
        if self.spec.center_crop is not None:
            image = center_crop(image, self.spec.center_crop)
        return image

    def check_observation(self, observation: Mapping) -> None:
        images = observation.get("images")
        if not isinstance(images, Mapping):
            raise SpecMismatchError("observation['images'] must map camera names to images")
        missing = [c for c in self.spec.cameras if c not in images]
        if missing:
            raise SpecMismatchError(
                f"observation lacks cameras {missing}; the policy was trained with {self.spec.cameras}"
            )
        if self.spec.proprio_dim:
            proprio = np.asarray(observation.get("proprio", ()), dtype=np.float64)
            if proprio.shape != (self.spec.proprio_dim,):
                raise SpecMismatchError(
                    f"observation['proprio'] has shape {proprio.shape}, the policy was "
                    f"trained with proprio of {self.spec.proprio_dim} ({self.spec.proprio_names})"
                )
        if not isinstance(observation.get("instruction"), str):
            raise SpecMismatchError("observation['instruction'] must be a string")

    def make_batch(self, observations: Sequence[Mapping]) -> dict:
        """The model batch for a list of observations (the layout of the trajectory data module)."""
        rows, pixel_values, grids, proprio = [], [], [], []
        for obs in observations:
            self.check_observation(obs)
            vision = self.image_processor(images=[self._image(obs["images"][c]) for c in self.spec.cameras])
            counts = [self.image_processor.num_image_tokens(g) for g in vision["image_grid_thw"]]
            rows.append(
                encode_action_prompt(
                    self.tokenizer,
                    obs["instruction"],
                    counts,
                    self.spec.horizon * self.spec.action_dim,
                    use_proprio=self.spec.proprio_dim > 0,
                    system_prompt=self.spec.system_prompt,
                    instruction_template=self.spec.instruction_template,
                )
            )
            pixel_values.append(vision["pixel_values"])
            grids.append(vision["image_grid_thw"])
            if self.spec.proprio_dim:
                proprio.append(self.spec.proprio_normalizer.normalize(np.asarray(obs["proprio"], np.float32)))
        length = max(len(r.input_ids) for r in rows)

        def pad(values, fill, dtype=torch.long):
            return torch.tensor([list(v) + [fill] * (length - len(v)) for v in values], dtype=dtype)

        batch = {
            "input_ids": pad([r.input_ids for r in rows], self.tokenizer.pad_token_id),
            "labels": pad([r.labels for r in rows], IGNORE_INDEX),
            "attention_mask": pad([[1] * len(r.input_ids) for r in rows], 0),
            "action_slots": pad([r.action_slots for r in rows], False, torch.bool),
            "proprio_slots": pad([r.proprio_slots for r in rows], False, torch.bool),
            "prefix_mask": pad([r.prefix for r in rows], False, torch.bool),
            "pixel_values": torch.cat(pixel_values),
            "image_grid_thw": torch.cat(grids),
            "proprio": torch.tensor(
                np.stack(proprio) if proprio else np.zeros((len(rows), 0)), dtype=torch.float32
            ),
        }
        return {k: v.to(self.device) for k, v in batch.items()}

    # -------------------------------------------------------------------------------------- actions
    @torch.no_grad()
    def predict_batch(self, observations: Sequence[Mapping], steps: int | None = None) -> np.ndarray:
        """Action chunks [B, H, A] in robot units."""
        batch = self.make_batch(observations)
        normalised = (
            self.objective.sample(self.backbone, batch, steps=steps).float().cpu().numpy()
        )  # [B, H, A]
        if self.spec.action_normalizer.mode != "mean_std":
            # Bounded modes trained on targets in [-1, 1]; a continuous head may overshoot them.
            normalised = np.clip(normalised, -1.0, 1.0)
        actions = self.spec.action_normalizer.unnormalize(normalised)
        return np.asarray(actions, dtype=np.float32)

    def predict(self, observation: Mapping, steps: int | None = None) -> np.ndarray:
        """One action chunk [H, A] in robot units."""
        return self.predict_batch([observation], steps=steps)[0]


class ChunkExecutor:
    """Runs the first `open_loop_steps` actions of each predicted chunk before asking for a new one.

    The queue is consumed from the front (chunk[0], chunk[1], ...); the reference kept the wrong end.
    """

    def __init__(self, predict, open_loop_steps: int) -> None:
        if open_loop_steps < 1:
            raise ValueError(f"open_loop_steps must be >= 1, got {open_loop_steps}")
        self.predict = predict
        self.open_loop_steps = open_loop_steps
        self.queue: deque[np.ndarray] = deque()

    def reset(self) -> None:
        self.queue.clear()

    def act(self, observation: Mapping) -> np.ndarray:
        if not self.queue:
            chunk = self.predict(observation)
            if self.open_loop_steps > len(chunk):
                raise ValueError(
                    f"open_loop_steps {self.open_loop_steps} exceeds the chunk length {len(chunk)}"
                )
            self.queue.extend(chunk[: self.open_loop_steps])
        return self.queue.popleft()
