"""Inference for robots: an exported VLA -> action chunks in robot units.

    policy = Policy.from_pretrained("runs/tiny_vla_flow_matching/default/export")
    chunk = policy.predict({"images": {"agentview": rgb, "robot0_eye_in_hand": wrist},
                            "proprio": state, "instruction": "lift the cube"})     # [H, A] float32

An observation is a mapping with `images` (camera name -> H x W x 3 uint8 array or PIL image, every camera of
the action spec), `proprio` ([S] floats, when the spec has proprio) and `instruction` (str). Images go through
the preprocessing used in training: resize to the spec's square size, and the centre crop of the same area
when training used random crops. Proprio is normalised and actions un-normalised with the statistics stored
in the export, so the caller works in robot units only.

A caller that knows what it will feed and expects (an environment's cameras and dims, the statistics of its
data) passes it as `expected_spec` / `expected_stats_hash`; a difference is refused, naming it, unless
`allow_spec_mismatch=True` (`Policy.check_spec`).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from dvlx.backbone import DreamVL
from dvlx.config import ObjectiveConfig
from dvlx.export import ACTION_SPEC_FILE, EXPORT_MARKER, OBJECTIVE_FILE, stats_hash
from dvlx.objectives import objective_class
from dvlx.processing import IGNORE_INDEX, ImageProcessor, Tokenizer
from dvlx.processing.robot import ActionSpec, center_crop, encode_action_prompt, resize_image

log = logging.getLogger(__name__)

SPEC_CHECK_KEYS = (
    "action_dim",
    "proprio_dim",
    "cameras",
    "action_names",
    "proprio_names",
    "horizon",
    "control_hz",
    "image_size",
    "stats_hash",
)
"""What `spec_differences` compares: what the policy is fed and outputs, and the normalisation statistics."""


class SpecMismatchError(ValueError):
    """An observation or a caller's expectation does not match the spec the checkpoint was trained with."""


def spec_differences(trained: ActionSpec, expected: ActionSpec | Mapping[str, Any]) -> list[str]:
    """`key: trained X, expected Y` for every key of `SPEC_CHECK_KEYS` that differs; `expected` is an
    `ActionSpec` or a mapping with some of those keys (`stats_hash` from `dvlx.export.stats_hash`)."""
    if isinstance(expected, ActionSpec):
        given = {**expected.to_dict(), "stats_hash": stats_hash(expected)}
        given = {k: given[k] for k in SPEC_CHECK_KEYS}
    else:
        given = dict(expected)
        unknown = sorted(set(given) - set(SPEC_CHECK_KEYS))
        if unknown:
            raise ValueError(f"expected spec has unknown keys {unknown}; known: {list(SPEC_CHECK_KEYS)}")
    ours = {**trained.to_dict(), "stats_hash": stats_hash(trained)}
    return [f"{k}: trained {ours[k]!r}, expected {v!r}" for k, v in given.items() if ours[k] != v]


def require_spec(
    trained: ActionSpec,
    expected: ActionSpec | Mapping[str, Any],
    *,
    allow_mismatch: bool = False,
    where: str = "policy",
) -> list[str]:
    """Refuses (`SpecMismatchError`) an expected spec that differs from the trained one, naming each
    difference; with `allow_mismatch` the differences are logged as a warning and returned."""
    differences = spec_differences(trained, expected)
    if differences and not allow_mismatch:
        raise SpecMismatchError(
            f"{where}: the policy was trained with another spec: "
            + "; ".join(differences)
            + " (allow_spec_mismatch=True overrides)"
        )
    if differences:
        log.warning("%s: spec differences allowed: %s", where, "; ".join(differences))
    return differences


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
        expected_spec: ActionSpec | Mapping[str, Any] | None = None,
        expected_stats_hash: str | None = None,
        allow_spec_mismatch: bool = False,
    ) -> Policy:
        """Loads an export written by `dvlx.fit` (VLA stage); a spec or statistics edited after the export are
        refused. With `expected_spec_fingerprint`, `expected_spec` or `expected_stats_hash` (from the data or
        environment a caller prepared), a difference is refused unless `allow_spec_mismatch`."""
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
        if meta.get("stats_hash") not in (None, stats_hash(spec)):
            raise SpecMismatchError(
                f"{folder / ACTION_SPEC_FILE}: statistics hash {stats_hash(spec)} differs from the one "
                f"recorded at export ({meta['stats_hash']}); the statistics were edited after training"
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
        checks = [expected_spec] if expected_spec is not None else []
        if expected_stats_hash is not None:
            checks.append({"stats_hash": expected_stats_hash})
        for expected in checks:
            require_spec(spec, expected, allow_mismatch=allow_spec_mismatch, where=str(folder))
        tokenizer = Tokenizer.from_pretrained(folder)
        backbone = DreamVL.from_pretrained(folder, dtype=dtype, device=device)
        backbone.config.attention = meta.get("attention", backbone.config.attention)
        objective_cfg = ObjectiveConfig(**meta["objective"])
        objective = objective_class(objective_cfg.name)(
            spec, backbone.config.hidden_size, objective_cfg, tokenizer
        )
        objective.load_state_dict(load_file(str(folder / OBJECTIVE_FILE)))
        objective.to(device=device, dtype=dtype or torch.float32)
        processor = ImageProcessor.from_pretrained(folder)
        return cls(backbone, objective, tokenizer, processor, spec, str(folder))

    @property
    def stats_hash(self) -> str:
        """Hash of the normalisation statistics the policy was trained with (`dvlx.export.stats_hash`)."""
        return stats_hash(self.spec)

    def check_spec(self, expected: ActionSpec | Mapping[str, Any], allow_mismatch: bool = False) -> list[str]:
        """`require_spec` against the spec this policy was trained with (for rollout evaluation: the
        environment's cameras and dims, the statistics of the data it was set up with)."""
        return require_spec(self.spec, expected, allow_mismatch=allow_mismatch, where=self.source or "policy")

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
