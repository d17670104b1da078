#!/usr/bin/env python3
"""What picking one greedy token costs: llama.cpp's greedy sampler against
the argmax offgrid takes for plain greedy requests (BatchScheduler.sample).

    python bench/sampling_cost.py [--model GGUF] [--reps 7]

Loads the model (default: the Gemma 3 270M package, 262,144-entry
vocabulary) into offgrid's BatchScheduler, decodes one short prompt, then
times, on that same row of logits, 100 calls of `llama_sampler_sample` with
a chain holding only the greedy sampler (which first fills a candidate array
with the whole vocabulary) and 100 numpy argmaxes, --reps times, and checks
that both pick the same token. One thread, no inference while timing.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import offgrid  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: Gemma 3 270M from its package)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    import llama_cpp as lc
    import numpy
    model = args.model
    if not model:
        store = offgrid.ModelStore(tempfile.mkdtemp(prefix="offgrid-bench-sampling-"))
        manifest = store.install_packaged(offgrid.GEMMA)
        if manifest is None:
            sys.exit("give --model, or install the Gemma 3 270M package")
        model = store.gguf_path(manifest)
    llm = lc.Llama(model_path=model, n_ctx=offgrid.TOKENIZER_CTX, n_batch=offgrid.TOKENIZER_BATCH, n_threads=2,
                   n_threads_batch=2, verbose=False)
    sch = offgrid.BatchScheduler(llm, 1, 512, 64, 2, True)
    tokens = llm.tokenize(b"1, 2, 3, 4,", add_bos=True)
    n = 0
    for i, token in enumerate(tokens):
        n = sch._add(n, token, i, 0, i == len(tokens) - 1)
    sch.batch.n_tokens = n
    if lc.llama_decode(sch.ctx, sch.batch) != 0:
        sys.exit("llama_decode failed")
    row = n - 1
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    sampler, argmax = [], []
    for _ in range(args.reps):
        started = time.perf_counter()
        for _ in range(100):
            a = lc.llama_sampler_sample(chain, sch.ctx, row)
        sampler.append((time.perf_counter() - started) / 100)
        started = time.perf_counter()
        for _ in range(100):
            b = int(numpy.ctypeslib.as_array(lc.llama_get_logits_ith(sch.ctx, row), shape=(sch.n_vocab,)).argmax())
        argmax.append((time.perf_counter() - started) / 100)
    lc.llama_sampler_free(chain)
    sch.close()
    print("vocabulary %d tokens; per token, median (best) of %d x 100:" % (sch.n_vocab, args.reps))
    print("  llama.cpp greedy sampler  %6.0f us (%.0f)" % (1e6 * statistics.median(sampler), 1e6 * min(sampler)))
    print("  numpy argmax              %6.0f us (%.0f)" % (1e6 * statistics.median(argmax), 1e6 * min(argmax)))
    print("  same token: %s" % (a == b))


if __name__ == "__main__":
    main()
