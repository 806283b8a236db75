"""Chat templates: LLaVA-style conversations -> token ids and diffusion labels.

Conventions (reference spec 2.6, 5.2, 5.3):
- Each `<image>` in the text becomes `num_image_tokens[k]` copies of `tokenizer.image_token_id` (k counts
  placeholders across the whole conversation); image tokens are never targets.
- `labels[i]` is the token id where token i is maskable (a diffusion target) and IGNORE_INDEX elsewhere.
- No `<|vision_start|>`/`<|vision_end|>` around images: the official weights were trained without them.
- EOS policy: `num_eos` copies of the eos token follow the last turn and are maskable. This replaces the
  reference, whose collator pads labels with eos up to the longest sample of the batch, so that the number of
  eos targets a sample gets depended on its batch; here it is a property of the sample alone.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dvlx.processing.tokenizer import IM_END, IM_START, Tokenizer

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
TEMPLATES = ("plain", "qwen_2_5")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        close = difflib.get_close_matches(template, TEMPLATES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown chat template {template!r}, expected one of {TEMPLATES}{hint}")


def _turns(conversation: Sequence[dict]) -> list[tuple[str, str]]:
    """(role, text) pairs with role in {system, user, assistant}, from either LLaVA or OpenAI keys."""
    turns = []
    for index, turn in enumerate(conversation):
        if "from" in turn and "value" in turn:
            speaker, text = turn["from"], turn["value"]
        elif "role" in turn and "content" in turn:
            speaker, text = turn["role"], turn["content"]
        else:
            raise ValueError(
                f"conversation turn {index} needs keys from/value or role/content, got {sorted(turn)}"
            )
        if speaker not in _ROLES:
            raise ValueError(
                f"conversation turn {index} has speaker {speaker!r}, expected one of {sorted(_ROLES)}"
            )
        if not isinstance(text, str):
            raise ValueError(f"conversation turn {index} text must be a string, got {type(text).__name__}")
        turns.append((_ROLES[speaker], text))
    return turns


def _image_first(text: str) -> str:
    """A single placeholder not already at the start moves to the front as `<image>\\n` (reference rule)."""
    if text.count(IMAGE_PLACEHOLDER) != 1 or text.startswith(IMAGE_PLACEHOLDER):
        return text
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return (IMAGE_PLACEHOLDER + "\n" + rest).strip()


def _check_image_counts(texts: Sequence[str], num_image_tokens: Sequence[int]) -> Iterator[int]:
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for text in texts)
    if placeholders != len(num_image_tokens):
        raise ValueError(
            f"conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholders but num_image_tokens has "
            f"{len(num_image_tokens)} entries"
        )
    for count in num_image_tokens:
        if isinstance(count, bool) or int(count) != count or count <= 0:
            raise ValueError(f"num_image_tokens entries must be positive ints, got {list(num_image_tokens)}")
    return iter(int(count) for count in num_image_tokens)


def _encode_with_images(
    tokenizer: Tokenizer, text: str, image_counts: Iterator[int]
) -> tuple[list[int], list[bool]]:
    """Ids of `text` with each placeholder expanded; the flags mark image tokens."""
    ids: list[int] = []
    is_image: list[bool] = []
    for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index > 0:
            count = next(image_counts)
            ids += [tokenizer.image_token_id] * count
            is_image += [True] * count
        if piece:
            piece_ids = tokenizer.encode(piece)
            ids += piece_ids
            is_image += [False] * len(piece_ids)
    return ids, is_image


def _chat_turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def encode_conversation(
    tokenizer: Tokenizer,
    conversation: Sequence[dict],
    template: str,
    num_image_tokens: Sequence[int],
    *,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    num_eos: int = 0,
    prompt_structure_maskable: bool = False,
) -> EncodedConversation:
    """Token ids and labels of one conversation under `template` ("plain" or "qwen_2_5").

    plain: exactly a human turn with image placeholder(s) and a gpt caption; the human text is replaced by
    the images; sequence = images + caption + "\\n"; labels = caption and "\\n".
    qwen_2_5: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn after a system turn (the conversation's
    own system turn, else `system_prompt`); a leading non-user turn is dropped; every assistant-turn token is
    a target. `prompt_structure_maskable=True` reproduces the reference, which also makes `<|im_start|>`,
    `<|im_end|>` and lone "\\n" tokens of system/user turns targets.
    """
    _check_template(template)
    if isinstance(num_eos, bool) or not isinstance(num_eos, int) or num_eos < 0:
        raise ValueError(f"num_eos must be a non-negative int, got {num_eos!r}")
    turns = _turns(conversation)
    if template == "plain":
        input_ids, labels = _encode_plain(tokenizer, turns, num_image_tokens)
    else:
        input_ids, labels = _encode_qwen(
            tokenizer, turns, num_image_tokens, system_prompt, prompt_structure_maskable
        )
    eos = [tokenizer.eos_token_id] * num_eos
    return EncodedConversation(input_ids=input_ids + eos, labels=labels + eos)


def _encode_plain(
    tokenizer: Tokenizer, turns: list[tuple[str, str]], num_image_tokens: Sequence[int]
) -> tuple[list[int], list[int]]:
    roles = [role for role, _ in turns]
    if roles != ["user", "assistant"]:
        raise ValueError(f"template 'plain' needs exactly a human turn then a gpt turn, got roles {roles}")
    (_, prompt), (_, caption) = turns
    num_images = prompt.count(IMAGE_PLACEHOLDER)
    if num_images == 0:
        raise ValueError(f"template 'plain' needs {IMAGE_PLACEHOLDER} in the human turn, got {prompt!r}")
    if IMAGE_PLACEHOLDER in caption:
        raise ValueError(f"template 'plain' takes no {IMAGE_PLACEHOLDER} in the gpt turn, got {caption!r}")
    image_counts = _check_image_counts([prompt], num_image_tokens)
    # The reference discards the human text and keeps only its image(s).
    image_ids, _ = _encode_with_images(tokenizer, IMAGE_PLACEHOLDER * num_images, image_counts)
    caption_ids = tokenizer.encode(caption + "\n")
    return image_ids + caption_ids, [IGNORE_INDEX] * len(image_ids) + caption_ids


def _qwen_turns(turns: list[tuple[str, str]], system_prompt: str) -> list[tuple[str, str]]:
    """System turn first, then the conversation starting at a user turn, placeholders moved to the front."""
    system = system_prompt
    if turns and turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
    if turns and turns[0][0] != "user":
        turns = turns[1:]
    for index, (role, _) in enumerate(turns):
        if role == "system":
            raise ValueError(f"a system turn may only open the conversation, found one at turn {index}")
    return [("system", system)] + [(role, _image_first(text)) for role, text in turns]


def _encode_qwen(
    tokenizer: Tokenizer,
    turns: list[tuple[str, str]],
    num_image_tokens: Sequence[int],
    system_prompt: str,
    prompt_structure_maskable: bool,
) -> tuple[list[int], list[int]]:
    turns = _qwen_turns(turns, system_prompt)
    image_counts = _check_image_counts([text for _, text in turns], num_image_tokens)
    structural = {tokenizer.im_start_token_id, tokenizer.im_end_token_id, tokenizer.newline_token_id}
    input_ids: list[int] = []
    labels: list[int] = []
    for role, text in turns:
        # One string per turn, as the reference encodes each message on its own; special-token strings in it
        # are single ids, so only the placeholders need splitting.
        ids, is_image = _encode_with_images(tokenizer, _chat_turn(role, text), image_counts)
        input_ids += ids
        for token, image in zip(ids, is_image, strict=True):
            target = role == "assistant" or (prompt_structure_maskable and token in structural)
            labels.append(token if target and not image else IGNORE_INDEX)
    return input_ids, labels


def generation_prompt(
    tokenizer: Tokenizer,
    question: str,
    template: str,
    num_image_tokens: Sequence[int],
    *,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[int]:
    """Prompt ids for answering `question`, laid out exactly as in training up to the answer.

    qwen_2_5: system turn + user turn + `<|im_start|>assistant\\n`. plain: only the image tokens (the plain
    template never shows the model any question text). A question without placeholders gets one `<image>\\n`
    per image in front, the layout training used.
    """
    _check_template(template)
    if IMAGE_PLACEHOLDER not in question:
        question = (IMAGE_PLACEHOLDER + "\n") * len(num_image_tokens) + question
    if template == "plain":
        image_counts = _check_image_counts([question], num_image_tokens)
        ids, _ = _encode_with_images(tokenizer, IMAGE_PLACEHOLDER * len(num_image_tokens), image_counts)
        return ids
    prompt = encode_conversation(
        tokenizer,
        [{"role": "user", "content": question}],
        template,
        num_image_tokens,
        system_prompt=system_prompt,
    )
    header = tokenizer.encode(f"{IM_START}assistant\n")
    return prompt.input_ids + header
