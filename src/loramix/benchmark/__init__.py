"""Speed and memory benchmark of loramix against PEFT LoRA and the official ``mixlora`` package
(``loramix bench``; ``python -m bench.run_bench`` in a source checkout). See :mod:`loramix.benchmark.harness`."""
