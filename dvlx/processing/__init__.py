"""Text and image preprocessing: tokenizer wrapper, chat templates and the Qwen2-VL image processor."""

from dvlx.processing.image import ImageProcessor, smart_resize
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
    "SPECIAL_TOKENS",
    "TEMPLATES",
    "EncodedConversation",
    "ImageProcessor",
    "Tokenizer",
    "build_tiny_tokenizer",
    "encode_conversation",
    "generation_prompt",
    "smart_resize",
]
