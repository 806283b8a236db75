"""Text and image preprocessing: tokenizer wrapper, chat templates and the Qwen2-VL image processor."""

from dvlx.processing.image import ImageProcessor, smart_resize
from dvlx.processing.robot import (
    NORMALIZATION_MODES,
    ActionPrompt,
    ActionSpec,
    ArrayStats,
    Normalizer,
    augment_image,
    center_crop,
    encode_action_prompt,
    normalize_instruction,
    resize_image,
)
from dvlx.processing.templates import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    EncodedConversation,
    encode_conversation,
    generation_prompt,
)
from dvlx.processing.tokenizer import SPECIAL_TOKENS, Tokenizer, build_tiny_tokenizer

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "NORMALIZATION_MODES",
    "SPECIAL_TOKENS",
    "TEMPLATES",
    "ActionPrompt",
    "ActionSpec",
    "ArrayStats",
    "EncodedConversation",
    "ImageProcessor",
    "Normalizer",
    "Tokenizer",
    "augment_image",
    "build_tiny_tokenizer",
    "center_crop",
    "encode_action_prompt",
    "encode_conversation",
    "generation_prompt",
    "normalize_instruction",
    "resize_image",
    "smart_resize",
]
