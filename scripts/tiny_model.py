"""Write a tiny llama-architecture GGUF with seeded random weights, for fast protocol tests.

The model is a real one to the engines: Ollama and llama.cpp load it and run real forward passes,
about 2,000 tokens/s on Ollama with two CPU cores. What it says is printable-ASCII nonsense, and it
never emits its end-of-turn token, so a generation always runs to the requested token limit.

    python scripts/tiny_model.py OUT.gguf [--seed 7]

Needs `gguf` and `numpy` (scripts/test-engines.sh installs them into the engines' own venv).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np
from gguf import GGUFWriter, TokenType

WIDTH, LAYERS, HEADS, HIDDEN, CONTEXT = 64, 2, 4, 128, 2048
END_OF_TURN = "<|im_end|>"
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "on",
    "was",
    "hello",
    "world",
    "river",
    "stone",
    "light",
    "one",
    "two",
    "three",
    "yes",
    "no",
]


def vocabulary() -> list[tuple[str, float, TokenType]]:
    """Control tokens, all 256 byte tokens (the tokenizer falls back to them), then printable pieces."""
    vocab = [("<unk>", 0.0, TokenType.UNKNOWN)]
    vocab += [(piece, 0.0, TokenType.CONTROL) for piece in ("<s>", "</s>", "<|im_start|>", END_OF_TURN)]
    vocab += [(f"<0x{byte:02X}>", 0.0, TokenType.BYTE) for byte in range(256)]
    printable = [chr(code) for code in range(33, 127)] + WORDS
    pieces = ["\u2581", *printable, *("\u2581" + piece for piece in printable)]
    seen = {piece for piece, _, _ in vocab}
    for rank, piece in enumerate(dict.fromkeys(pieces)):
        if piece not in seen:
            vocab.append((piece, -1.0 - rank / 10, TokenType.NORMAL))
    return vocab


def never_emitted(piece: str, kind: TokenType) -> bool:
    """Tokens the model must not produce: control tokens and bytes that are not printable text."""
    if kind in (TokenType.CONTROL, TokenType.UNKNOWN):
        return True
    if kind == TokenType.BYTE:
        byte = int(piece[3:5], 16)
        return not (byte in (0x09, 0x0A) or 0x20 <= byte <= 0x7E)
    return False


def tensors(vocab: list[tuple[str, float, TokenType]], seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Weights in GGUF naming; numpy shapes are (rows, columns), the reverse of GGUF's order.

    Column 0 of the residual stream is a constant bias lane: every embedding sets it, no layer
    writes to it, so it stays positive through the final norm. The output head reads that lane
    with a large negative weight for the tokens that must never be emitted.
    """
    rng = np.random.default_rng(seed)

    def random(rows: int, columns: int, *, writes_residual: bool = False) -> np.ndarray:
        matrix = (rng.standard_normal((rows, columns)) * 0.5 / np.sqrt(columns)).astype(np.float32)
        if writes_residual:
            matrix[0, :] = 0.0  # keep the bias lane constant
        return matrix

    embedding = random(len(vocab), WIDTH)
    embedding[:, 0] = 4.0
    head = random(len(vocab), WIDTH)
    head[:, 0] = [-30.0 if never_emitted(piece, kind) else 0.0 for piece, _, kind in vocab]
    ones = np.ones(WIDTH, dtype=np.float32)

    yield "token_embd.weight", embedding
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        yield f"{block}.attn_norm.weight", ones
        for name in ("attn_q", "attn_k", "attn_v"):
            yield f"{block}.{name}.weight", random(WIDTH, WIDTH)
        yield f"{block}.attn_output.weight", random(WIDTH, WIDTH, writes_residual=True)
        yield f"{block}.ffn_norm.weight", ones
        yield f"{block}.ffn_gate.weight", random(HIDDEN, WIDTH)
        yield f"{block}.ffn_up.weight", random(HIDDEN, WIDTH)
        yield f"{block}.ffn_down.weight", random(WIDTH, HIDDEN, writes_residual=True)
    yield "output_norm.weight", ones
    yield "output.weight", head


def write(path: str, seed: int) -> None:
    vocab = vocabulary()
    writer = GGUFWriter(path, "llama")
    writer.add_name("phoenix-tiny-random")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(HIDDEN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(WIDTH // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(vocab))
    writer.add_file_type(0)  # every tensor in float32
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([piece for piece, _, _ in vocab])
    writer.add_token_scores([score for _, score, _ in vocab])
    writer.add_token_types([int(kind) for _, _, kind in vocab])
    pieces = [piece for piece, _, _ in vocab]
    writer.add_unk_token_id(pieces.index("<unk>"))
    writer.add_bos_token_id(pieces.index("<s>"))
    writer.add_eos_token_id(pieces.index(END_OF_TURN))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(TEMPLATE)
    for name, array in tensors(vocab, seed):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    write(args.out, args.seed)


if __name__ == "__main__":
    main()
