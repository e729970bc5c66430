"""`dynlm bench`: what online adaptation and meta-training cost next to static training.

Every measurement runs in one process on one model (`model.*`), one batch shape (`bench.batch_size`
streams, `eval.segment_length`-token chunks) and the same random tokens, through the code paths the
real commands use: the static training step, `unroll.Stepper` for evaluation (every rule) and
`unroll.TruncatedUnroll` for meta-training (K = `meta.unroll` chunk steps with meta=True, the held-back
update of the previous meta-step replayed first, then backward and the outer optimizer step).
After `bench.warmup` untimed calls (where torch.compile compiles; their time is reported), the
measurements take turns, repeat after repeat, so that a load change on a shared machine hits all of
them alike; each reports the median of `bench.repeats` repeats. Peak memory of one meta-step is
measured per unroll length in a fresh process each.

Throughput is reported as ratios against static training: absolute tokens/s depend on the machine,
the ratios are what the performance targets are stated in.
"""
# The modules: workloads (what is timed, and the timing), reference (the nn.LSTM reference model),
# memory (peak-memory probes in fresh processes), report (ratios, bounds, the table), run (`dynlm bench`).
