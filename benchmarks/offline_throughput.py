"""Offline throughput: tokenmill's LLM.generate vs transformers' generate in padded batches, one run.

Workload (the engine issue's): N requests, prompts of random length in [32, 512] tokens (random ids from
the vocabulary, no special tokens), outputs of random length in [32, 256] tokens, ignore_eos, greedy.
transformers runs the same requests in arrival order, B at a time, left-padded, each batch generating until
its longest output is done (what a simple demo server does); only the tokens each request asked for count.

    .venv/bin/python benchmarks/offline_throughput.py [--num-requests 64] [--hf-batch-size 16] [--json out.json]

Also measures single-request decode speed (one 128-token prompt, 256 new tokens) for both.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def make_workload(n: int, vocab: int, special: set[int], seed: int):
    rng = random.Random(seed)
    usable = [t for t in range(vocab) if t not in special]
    prompts = [[rng.choice(usable) for _ in range(rng.randint(32, 512))] for _ in range(n)]
    outputs = [rng.randint(32, 256) for _ in range(n)]
    return prompts, outputs


def run_tokenmill(prompts, outputs, args):
    from tokenmill import LLM, SamplingParams

    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False)
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    assert produced == sum(outputs), (produced, sum(outputs))
    single = _single_stream(lambda p, n: llm.generate(
        [{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False),
        prompts)
    return {"seconds": elapsed, "output_tokens": produced, "output_tok_s": produced / elapsed,
            "total_tok_s": (produced + sum(map(len, prompts))) / elapsed, "single_decode_tok_s": single}


def run_transformers(prompts, outputs, args):
    from transformers import AutoModelForCausalLM

    from tokenmill.models.source import default_model_path, resolve_source

    src = resolve_source(args.model) if args.model else None
    if src is None or src.kind == "gguf":
        path = src.path if src else default_model_path()
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32)
    model.eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    b = args.hf_batch_size
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), b):
            batch, lens = prompts[i:i + b], outputs[i:i + b]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                           do_sample=False, pad_token_id=pad)
            print(f"  transformers batch {i // b + 1}/{-(-len(prompts) // b)}: {time.perf_counter() - start:.0f}s",
                  flush=True)
    elapsed = time.perf_counter() - start

    def one(p, n):
        with torch.inference_mode():
            model.generate(input_ids=torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=pad)

    single = _single_stream(one, prompts)
    return {"seconds": elapsed, "output_tokens": sum(outputs), "output_tok_s": sum(outputs) / elapsed,
            "total_tok_s": (sum(outputs) + sum(map(len, prompts))) / elapsed, "single_decode_tok_s": single}


def _single_stream(generate, prompts) -> float:
    """Decode tok/s of one request: (time for 256 new tokens - time for 1) / 255, removing the prefill."""
    prompt = (prompts[0] * 2)[:128]
    t0 = time.perf_counter()
    generate(prompt, 1)
    t1 = time.perf_counter()
    generate(prompt, 256)
    t2 = time.perf_counter()
    return 255 / ((t2 - t1) - (t1 - t0))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2 GGUF)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    from tokenmill.models.loader import load_model
    from tokenmill.tokenizer.load import load_tokenizer

    loaded = load_model(args.model)
    tok = load_tokenizer(loaded)
    prompts, outputs = make_workload(args.num_requests, loaded.config.vocab_size, tok.all_special_ids, args.seed)
    del loaded
    print(f"workload: {len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, {sum(outputs)} output tokens")
    results = {"tokenmill": run_tokenmill(prompts, outputs, args)}
    print("tokenmill:", json.dumps(results["tokenmill"]))
    if not args.skip_transformers:
        results["transformers"] = run_transformers(prompts, outputs, args)
        print("transformers:", json.dumps(results["transformers"]))
        ours, ref = results["tokenmill"], results["transformers"]
        results["ratio_output_tok_s"] = ours["output_tok_s"] / ref["output_tok_s"]
        results["ratio_single_decode"] = ours["single_decode_tok_s"] / ref["single_decode_tok_s"]
        print(f"\noutput tok/s: tokenmill {ours['output_tok_s']:.1f}, transformers {ref['output_tok_s']:.1f} "
              f"-> {results['ratio_output_tok_s']:.2f}x")
        print(f"single-request decode tok/s: tokenmill {ours['single_decode_tok_s']:.1f}, transformers "
              f"{ref['single_decode_tok_s']:.1f} -> {results['ratio_single_decode']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
