"""Tokenizer wrapper (Qwen2 byte-level BPE as used by Dream) and a tiny offline tokenizer for tests.

Special ids are always looked up by token string in the loaded vocabulary; nothing here knows the official
numbers. The tiny tokenizer places the special tokens after its learned vocabulary in a different order than
the official one, so code that relies on literal ids fails under test.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Config field name -> token string; pad and bos share the eos token as in the official Dream-VL config.
SPECIAL_TOKENS = {
    "mask_token_id": "<|mask|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "vision_token_id": "<|vision_pad|>",
    "im_start_token_id": IM_START,
    "im_end_token_id": IM_END,
    "eos_token_id": EOS_TOKEN,
}

# Added tokens of the Dream tokenizer in their official order; the flag says whether the token is special.
DREAM_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<|beginoftext|>", True),
    ("<|mask|>", True),
)

# A fixed permutation of DREAM_ADDED_TOKENS for the tiny tokenizer: mask first, eos in the middle, so that
# neither the official ids nor the official relative order hold.
_TINY_ADDED_ORDER = (23, 13, 2, 11, 17, 0, 12, 10, 1, 9, 22, 5, 3, 15, 7, 20, 4, 14, 6, 21, 8, 16, 19, 18)

_TINY_VOCAB_SIZE = 768

_TINY_ENGLISH = """\
You are a helpful assistant.
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
This is an image of a simple scene. The scene has a few objects on a plain background.
Look at the picture and answer the question. Answer with a single word or a short phrase.
Describe the image in one sentence. The image shows shapes of different colours.
There is a table in the room, and on the table there is a cup of tea.
The robot picks up the bowl and places it on the plate. Open the drawer and put the cup inside.
Move the arm to the left, then to the right. Close the gripper. Lift the object up.
What do you see? I see a red ball and a green box. Is the sky blue? Yes, it is.
Where is the cat? The cat is under the chair. How many birds are there? There are two birds.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 2024. The answer is 7.
user assistant system question answer caption image picture photo colour color shape position count
"""

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta")
_SHAPES = ("circle", "square", "triangle")
_POSITIONS = (
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "middle",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)
_COUNTS = ("one", "two", "three", "four", "five")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def tiny_corpus() -> list[str]:
    """Deterministic English lines covering the words of the synthetic datasets."""
    lines = _TINY_ENGLISH.splitlines()
    for i, (colour, shape) in enumerate(itertools.product(_COLOURS, _SHAPES)):
        position = _POSITIONS[i % len(_POSITIONS)]
        count = _COUNTS[i % len(_COUNTS)]
        lines += [
            f"What colour is the {shape}? The {shape} is {colour}.",
            f"What color is the {shape} in the image? {colour.capitalize()}.",
            f"What shape is the {colour} object? It is {_article(shape)} {shape}.",
            f"Where is the {colour} {shape}? It is at the {position} of the picture.",
            f"How many {colour} {shape}s are there? There are {count}. {i % 10}",
            f"Is there {_article(colour)} {colour} {shape} in the image? {'yes' if i % 2 else 'no'}",
            f"The {colour} {shape} is in the {position}.",
        ]
    # Short answers open the assistant turn right after a newline, without a leading space: these lines give
    # each answer word its own space-less token, so a one-word answer is one token.
    lines += [*_COLOURS, *_SHAPES, *_POSITIONS, "zero", *_COUNTS, "yes", "no"]
    return lines


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Qwen2's split then byte-level mapping, the regex being the one transformers rebuilds on every load."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


class Tokenizer:
    """Thin wrapper around a transformers Qwen2 tokenizer with Dream's special tokens resolved by string."""

    def __init__(self, hf_tokenizer: Qwen2Tokenizer, source: str = "<in memory>"):
        self.hf = hf_tokenizer
        self.source = source
        # Fail at construction, not at first use, when a required special token is missing.
        for token in SPECIAL_TOKENS.values():
            self._token_id(token)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        """Load `tokenizer.json` or the official `vocab.json` + `merges.txt` layout, without remote code."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder {folder} does not exist")
        has_json = (folder / "tokenizer.json").is_file()
        has_bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        if not (has_json or has_bpe_files):
            raise ValueError(
                f"tokenizer folder {folder} holds neither tokenizer.json nor vocab.json + merges.txt"
            )
        hf = Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
        _check_added_token_ids(hf, folder)
        return cls(hf, source=str(folder))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that loads without remote code."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        # A loaded official config still points at DreamTokenizer code that is not shipped; the saved
        # folder is a plain Qwen2 tokenizer, and the load-time flags describe this machine only.
        for key in ("auto_map", "is_local", "local_files_only"):
            config.pop(key, None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings map to their ids; nothing is added around the text."""
        return self.hf.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return len(self.hf)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._token_id(token)

    def add_tokens(self, tokens: list[str], special: bool = True) -> int:
        """Append tokens to the vocabulary (ids after the current last id); returns how many were new."""
        return self.hf.add_tokens([AddedToken(t, special=special, normalized=False) for t in tokens])

    def _token_id(self, token: str) -> int:
        token_id = self.hf.backend_tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary of the tokenizer from {self.source}")
        return token_id

    @property
    def mask_token_id(self) -> int:
        return self._token_id(SPECIAL_TOKENS["mask_token_id"])

    @property
    def image_token_id(self) -> int:
        return self._token_id(SPECIAL_TOKENS["image_token_id"])

    @property
    def video_token_id(self) -> int:
        return self._token_id(SPECIAL_TOKENS["video_token_id"])

    @property
    def vision_start_token_id(self) -> int:
        return self._token_id(SPECIAL_TOKENS["vision_start_token_id"])

    @property
    def vision_end_token_id(self) -> int:
        return self._token_id(SPECIAL_TOKENS["vision_end_token_id"])

    @property
    def vision_token_id(self) -> int:
        return self._token_id(SPECIAL_TOKENS["vision_token_id"])

    @property
    def im_start_token_id(self) -> int:
        return self._token_id(SPECIAL_TOKENS["im_start_token_id"])

    @property
    def im_end_token_id(self) -> int:
        return self._token_id(SPECIAL_TOKENS["im_end_token_id"])

    @property
    def eos_token_id(self) -> int:
        return self._token_id(EOS_TOKEN)

    @property
    def pad_token_id(self) -> int:
        return self._token_id(EOS_TOKEN)

    @property
    def bos_token_id(self) -> int:
        # Dream prepends no BOS; its config still names the eos id as bos, and so do we.
        return self._token_id(EOS_TOKEN)

    @property
    def newline_token_id(self) -> int:
        """Id of a lone "\\n" (a structural token of the chat template)."""
        ids = self.encode("\n")
        if len(ids) != 1:
            raise ValueError(f'"\\n" is not a single token in the tokenizer from {self.source}: {ids}')
        return ids[0]

    def special_ids(self) -> dict[str, int]:
        """Special ids under the field names of the model config."""
        names = (
            "mask_token_id",
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "vision_token_id",
            "pad_token_id",
            "eos_token_id",
            "bos_token_id",
        )
        return {name: getattr(self, name) for name in names}


def _check_added_token_ids(hf: Qwen2Tokenizer, folder: Path) -> None:
    """transformers re-adds added tokens one after another; make sure they landed on their declared ids."""
    config_path = folder / "tokenizer_config.json"
    declared: dict[int, str] = {}
    source = config_path
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        declared = {int(i): entry["content"] for i, entry in config.get("added_tokens_decoder", {}).items()}
    if not declared and (folder / "tokenizer.json").is_file():
        source = folder / "tokenizer.json"
        spec = json.loads(source.read_text(encoding="utf-8"))
        declared = {entry["id"]: entry["content"] for entry in spec.get("added_tokens", [])}
    for token_id, content in sorted(declared.items()):
        loaded = hf.backend_tokenizer.token_to_id(content)
        if loaded != token_id:
            raise ValueError(
                f"{source}: added token {content!r} is declared with id {token_id} but loaded as {loaded}; "
                "expected added tokens with contiguous ids right after the BPE vocabulary"
            )


def _new_backend(model: BPE) -> BackendTokenizer:
    backend = BackendTokenizer(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _qwen2_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    return backend


def build_tiny_tokenizer() -> Tokenizer:
    """A small byte-level BPE (Qwen2 pre-tokenizer) trained offline on a built-in corpus; deterministic."""
    trained = _new_backend(BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(tiny_corpus(), trainer)
    model = json.loads(trained.to_str())["model"]
    # Reverse the learned ids: merges are ranked by their order, not by id, so the tokenisation is unchanged,
    # but byte tokens such as "\n" no longer sit at their official ids either.
    last = len(model["vocab"]) - 1
    vocab = {token: last - token_id for token, token_id in model["vocab"].items()}
    backend = _new_backend(BPE(vocab=vocab, merges=[tuple(pair) for pair in model["merges"]]))
    added = [DREAM_ADDED_TOKENS[i] for i in _TINY_ADDED_ORDER]
    backend.add_tokens([AddedToken(token, special=special, normalized=False) for token, special in added])
    hf = Qwen2Tokenizer(
        tokenizer_object=backend,
        unk_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=None,
    )
    return Tokenizer(hf, source="build_tiny_tokenizer()")
