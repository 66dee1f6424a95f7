"""MaxText's own compile of Llama-3-8B for a TPU slice, read the way jaxalign's plan reads its own programs.

The side-by-side anchor of issue 19 (docs/performance.md, "On TPU"): MaxText 0.2.5's `train_compile`, run
unchanged, with its compiled step's memory analysis (libtpu's `peak_memory_in_bytes` and arguments +
temporaries), XLA's TPU cost-model time and the bytes of every collective in its HLO (counted by
`jaxalign.plan.collective_bytes`, as the plan counts jaxalign's). MaxText 0.2.5 needs Python >= 3.12:

  python3.12 -m venv /tmp/mtvenv && /tmp/mtvenv/bin/pip install "maxtext[tpu]==0.2.5"
  JAX_PLATFORMS=cpu /tmp/mtvenv/bin/python bench/maxtext_compile.py --seq_len=4096 --layers=32

`--layers=0` compiles the model as MaxText trains it (scanned layers: its memory); `--layers=N` compiles N
unrolled layers (the cost model counts a scanned body once, so the time of the whole model is that of its
32 layers unrolled, or extrapolated from 1 and 2). Nothing here runs in CI.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--seq_len", type=int, default=4096)
  ap.add_argument("--layers", type=int, default=0, help="0: scanned (MaxText's default); N: N unrolled layers")
  ap.add_argument("--topology", default="v5p-128")
  ap.add_argument("--model", default="llama3-8b")
  a = ap.parse_args()
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  sys.path.insert(0, ROOT)
  import maxtext
  from absl import app
  from maxtext.trainers.pre_train import train_compile

  from jaxalign import plan

  out = {}
  compile_step = train_compile.jit_and_compile

  def read(*args, **kwargs):  # MaxText's own compile, unchanged; only its result is read.
    compiled = compile_step(*args, **kwargs)
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out.update(peak_memory_bytes=int(getattr(m, "peak_memory_in_bytes", 0)),
               argument_bytes=int(m.argument_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
               step_seconds=float(cost.get("optimal_seconds", -1)),
               collective_bytes=plan.collective_bytes(compiled.as_text() or ""))
    return compiled

  train_compile.jit_and_compile = read
  layers = (["scan_layers=true"] if not a.layers else
            ["scan_layers=false", "override_model_config=true", f"base_num_decoder_layers={a.layers}"])
  argv = ["train_compile", os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml"),
          f"compile_topology={a.topology}", "compile_topology_num_slices=1", f"model_name={a.model}",
          "dtype=bfloat16", "weight_dtype=float32", "remat_policy=full", "ici_fsdp_parallelism=-1",
          "dataset_type=synthetic", "attention=flash", "enable_checkpointing=false",
          f"max_target_length={a.seq_len}", "per_device_batch_size=1", "run_name=plan",
          "base_output_directory=/tmp/maxtext_compile", *layers]
  try:
    app.run(train_compile.main, argv=argv)
  except SystemExit:
    pass
  print(json.dumps({"seq_len": a.seq_len, "layers": a.layers, **out}), flush=True)


if __name__ == "__main__":
  main()
