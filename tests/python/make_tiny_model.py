"""Writes a tiny llama-architecture GGUF model for tests against a real inference server.

Usage: python3 make_tiny_model.py OUT_DIR   (prints the path of OUT_DIR/tiny.gguf)

The weights are random (seeded, so every run writes the same bytes) and the model knows
nothing; it exists so that llama-cpp-python's OpenAI server (tests/tests/real_server.rs) can
run real streaming, grammar-constrained tool calls, JSON mode, logprobs and embeddings in
well under a second without a model hub. Facts it relies on are in ../shared/DESIGN.md §7.

Shape: 2 layers, embedding 64, 4 heads, feed-forward 128, F32, about 0.6 MB.
Vocabulary (llama/SentencePiece style): <unk> <s> </s> <|im_start|> <|im_end|> (the last three
CONTROL), the 256 byte tokens <0x00>..<0xFF>, then one token per printable ASCII character
(space spelt "▁" as SentencePiece does). EOS is <|im_end|>; the chat template is ChatML;
MEAN pooling makes /v1/embeddings work.

Random weights would emit bytes >= 0x80 (invalid UTF-8) and control tokens. Embedding
dimension 0 is therefore held at a constant that no layer writes to, so after the final norm
it acts as a per-token bias through column 0 of the output layer: a fixed ranking that puts
lower-case letters first, then JSON punctuation, digits, upper case, the end-of-turn token,
the space, and bytes and other control tokens far below. The ranking dominates the random
part of the logits, so greedy decoding is stable across runs and prompt-cache states, plain
replies are clean ASCII that run to `max_tokens`, and JSON grammars close as early as they
can (`{}` for json_object) before the end-of-turn token wins.
"""
import os
import sys

import numpy as np
import gguf

N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_LAYER = 2
N_CTX = 2048
SEED = 12

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocabulary():
    """Returns (tokens, scores, types, bias) in token id order."""
    tokens, types, bias = [], [], []

    def add(text, kind, b):
        tokens.append(text)
        types.append(kind)
        bias.append(b)

    add("<unk>", gguf.TokenType.UNKNOWN, -40.0)
    add("<s>", gguf.TokenType.CONTROL, -40.0)
    add("</s>", gguf.TokenType.CONTROL, -40.0)
    add("<|im_start|>", gguf.TokenType.CONTROL, -40.0)
    add("<|im_end|>", gguf.TokenType.CONTROL, 2.0)
    for b in range(256):
        add(f"<0x{b:02X}>", gguf.TokenType.BYTE, -40.0)
    # The ranking of printable characters, best first, each a quarter nat below the one
    # before: far more than the random part of the logits (about 0.03) can bridge.
    ranking = (
        "etaoinshrdlucmfwypvbgkjqxz"
        + '}"],:{[' + "'.-!?()/;=+*_&%$#@<>\\^`|~"
        + "0123456789"
        + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    )
    for i, c in enumerate(ranking):
        add(c, gguf.TokenType.NORMAL, 25.0 - 0.25 * i)
    add("\u2581", gguf.TokenType.NORMAL, 1.0)
    scores = [0.0] * 5 + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 261)]
    return tokens, scores, types, np.array(bias, dtype=np.float32)


def write(path):
    rng = np.random.default_rng(SEED)
    tokens, scores, types, bias = vocabulary()
    n_vocab = len(tokens)

    def rand(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("nearpath-tiny")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_pooling_type(gguf.PoolingType.MEAN)

    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHATML)

    # numpy shapes are the reverse of ggml's (ne0 is the last numpy axis).
    embd = rand(n_vocab, N_EMBD)
    embd[:, 0] = 1.0  # the bias carrier (see the module docstring)
    w.add_tensor("token_embd.weight", embd)
    for layer in range(N_LAYER):
        p = f"blk.{layer}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(p + "attn_k.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(p + "attn_v.weight", rand(N_EMBD, N_EMBD))
        out = rand(N_EMBD, N_EMBD)
        out[0, :] = 0.0  # nothing writes to the bias carrier
        w.add_tensor(p + "attn_output.weight", out)
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", rand(N_FF, N_EMBD))
        down = rand(N_EMBD, N_FF)
        down[0, :] = 0.0
        w.add_tensor(p + "ffn_down.weight", down)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    output = rand(n_vocab, N_EMBD)
    # After RMS norm the carrier is about sqrt(N_EMBD) while the rest stays small.
    output[:, 0] = bias / np.sqrt(N_EMBD)
    w.add_tensor("output.weight", output)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    os.makedirs(sys.argv[1], exist_ok=True)
    path = os.path.join(sys.argv[1], "tiny.gguf")
    write(path)
    print(path)


if __name__ == "__main__":
    main()
