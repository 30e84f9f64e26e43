"""grpo_jax.plan: slices by name, collectives read from HLO, analytic FLOPs, model presets,
and the trainer's programs compiled for TPU slices through libtpu (no TPU needed)."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import pytest

from grpo_jax import build, train
from grpo_jax.errors import UserError
from grpo_jax.models import hf, presets
from grpo_jax.plan import hlo, programs, report, roofline, topology

ROOT = pathlib.Path(__file__).resolve().parent.parent


# CI installs the [tpu] extra; without it (a plain `.[test]` install) these are skipped.
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (the [tpu] extra)")


@pytest.mark.parametrize("name, chips, libtpu_name", [
    ("v4-8", 4, "v4:2x2x1"), ("v4-32", 16, "v4:2x2x4"), ("v4-128", 64, "v4:4x4x4"),
    ("v5litepod-16", 16, "v5e:4x4"), ("v5e-8", 8, "v5e:2x4"), ("v5p-8", 4, "v5p:2x2x1"),
    ("v6e-8", 8, "v6e:2x4"), ("V5E:2x2", 4, "v5e:2x2")])
def test_gcloud_names_give_the_slice_shape(name, chips, libtpu_name):
  s = topology.parse(name)
  assert (s.num_chips, s.libtpu_name) == (chips, libtpu_name)


@pytest.mark.parametrize("name", ["v5e-3", "v9-8", "tpu", "v4-7"])
def test_bad_topology_is_one_user_error(name):
  with pytest.raises(UserError, match="topology|chips|TensorCores"):
    topology.parse(name)


def test_no_libtpu_says_how_to_get_it(monkeypatch):
  from jax.experimental import topologies

  def missing(**kwargs):
    raise RuntimeError("Unable to initialize backend 'tpu': no libtpu found")

  monkeypatch.setattr(topologies, "get_topology_desc", missing)
  with pytest.raises(UserError, match=r'pip install -e "\.\[tpu\]"'):
    topology.parse("v5e-8").devices()


HLO = """\
HloModule m

%cond (p: (s32[], f32[8,4])) -> pred[] {
  %p = (s32[], f32[8,4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(24)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[64,4]{1,0} all-gather(bf16[8,4]{1,0} %y), channel_id=7, replica_groups=mesh['axis_0'=2,'axis_1'=8] {'axis_1'}, dimensions={0}
  %ag2 = bf16[64,4]{1,0} all-gather(bf16[8,4]{1,0} %y), channel_id=7, replica_groups=mesh['axis_0'=2,'axis_1'=8] {'axis_1'}, dimensions={0}
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %x)
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %a = f32[8,4]{1,0} parameter(0)
  %ar = f32[1024,256]{1,0} all-reduce(f32[1024,256]{1,0} %a), channel_id=1, replica_groups=[2,8]<=[16], to_apply=%add
  %rs = f32[128,256]{1,0} reduce-scatter(f32[1024,256]{1,0} %a), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %w = (s32[], f32[8,4]) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[8,4] get-tuple-element(%w), index=1
}
"""


def test_collectives_counted_per_run_from_the_hlo():
  found = {c.kind: c for c in hlo.collectives(HLO)}
  # the loop's bound comes from its condition; the async copy (same channel) counts once
  assert found["all-gather"].count == 24 and found["all-gather"].group_size == 8
  assert found["all-gather"].buffer_bytes == 64 * 4 * 2
  assert found["all-reduce"].group_size == 8 and found["all-reduce"].count == 1
  assert found["reduce-scatter"].shape == (1024, 256)  # the buffer before scattering
  summary = hlo.summarize(list(hlo.collectives(HLO)))
  assert summary["all-gather"]["count"] == 24
  # ring algorithms: each chip sends (n-1)/n of the buffer, an all-reduce twice that
  assert math.isclose(summary["all-reduce"]["moved_bytes"], 2 * 1024 * 256 * 4 * 7 / 8)
  assert math.isclose(summary["all-gather"]["moved_bytes"], 24 * 512 * 7 / 8)


def test_unbounded_loop_uses_the_callers_trip_count():
  text = HLO.replace("%n = s32[] constant(24)", "%n = pred[] constant(true)")
  assert {c.kind: c.count for c in hlo.collectives(text, unknown_trips=99)}["all-gather"] == 99


def _loop_flops(cfg, prompts, group, prompt_tokens, length, beta):
  """The per-position sums the closed forms replace (benchmarks' original transcription)."""
  d, h, kv, layers, hd = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers,
                          cfg.head_dim)
  proj = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * cfg.intermediate_size)
  attn = lambda keys: 4 * h * hd * keys
  head = 2 * d * cfg.vocab_size
  rows, seq = prompts * group, prompt_tokens + length
  prefill = prompts * (layers * sum(proj + attn(i + 1) for i in range(prompt_tokens)) + head)
  decode = rows * sum(layers * (proj + attn(prompt_tokens + t + 1)) + head
                      for t in range(1, length))
  forward = rows * (layers * sum(proj + attn(i + 1) for i in range(seq)) + length * head)
  return prefill + decode, forward


def test_step_flops_closed_forms_equal_the_sums():
  cfg = hf.config_from_hf(presets.hf_config("preset:qwen3-0.6b"))
  flops = roofline.step_flops(cfg, 4, 8, 37, 51, beta=0.04)
  sampling, forward = _loop_flops(cfg, 4, 8, 37, 51, 0.04)
  assert flops["sampling"] == sampling and flops["reference"] == forward
  assert flops["train"] == 3 * forward
  assert roofline.step_flops(cfg, 4, 8, 37, 51, beta=0.0)["reference"] == 0


def test_roofline_names_the_dominant_bound():
  chip = topology.CHIPS["v5e"]
  assert roofline.estimate(197e12, 1.0, 1.0, chip) == (1.0, "compute")
  assert roofline.estimate(1.0, 819e9 * 3, 1.0, chip) == (3.0, "HBM")


# Published parameter counts (billions) of the checkpoints the presets describe.
PUBLISHED = {"qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09,
             "qwen2.5-7b": 7.62, "qwen3-0.6b": 0.596, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02,
             "qwen3-8b": 8.19, "llama3.2-1b": 1.24, "llama3.2-3b": 3.21, "llama3.1-8b": 8.03,
             "smollm2-135m": 0.135, "smollm2-360m": 0.362, "smollm2-1.7b": 1.71}


def test_presets_have_the_published_sizes():
  assert set(presets.names()) == set(PUBLISHED)
  for name, billions in PUBLISHED.items():
    cfg = hf.config_from_hf(presets.hf_config(f"preset:{name}"))
    assert abs(cfg.num_params() / 1e9 - billions) / billions < 0.01, name
  with pytest.raises(UserError, match="no such preset; presets: "):
    presets.hf_config("preset:gpt-5")


def test_train_says_a_preset_has_no_weights(tmp_path):
  from test_train import tiny_config
  config = tiny_config(model_path="preset:qwen2.5-0.5b")
  with pytest.raises(UserError, match="is a preset: shapes without weights"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  # the plan reads the same config: the preset's shapes, with the run's dtype
  cfg = build.model_config(tiny_config(model_path="preset:qwen2.5-0.5b", dtype="bfloat16"))
  assert (cfg.hidden_size, cfg.num_layers, cfg.dtype) == (896, 24, "bfloat16")


def _demo_config(**changes):
  sys.path.insert(0, str(ROOT / "configs"))
  import default
  c = default.get_config()
  c.update(changes)
  return c


@needs_libtpu
@pytest.mark.parametrize("parallelism", ["mesh", "pmap"])
def test_demo_programs_compile_for_v5e_2x2(parallelism):
  config = _demo_config(parallelism=parallelism)
  config.mesh.update(data=1, fsdp=4)
  s = topology.parse("v5e:2x2")
  d = report.plan_dict(programs.compile_plan(config, s.devices(), limit=s.memory_limit()), s, config)
  assert d["layout"] == ("mesh data=1 fsdp=4 tensor=1" if parallelism == "mesh" else "pmap x4")
  for name, p in d["phases"].items():
    assert p["total_bytes"] > 0 and p["temp_bytes"] >= 0 and p["params_bytes"] > 0, name
    # (a tiny model's temporaries may fit the chip's on-core memory: 0 bytes of HBM)
    parts = (p["params_bytes"] + p["optimizer_bytes"] + p["reference_bytes"] + p["temp_bytes"]
             + p["other_bytes"])
    assert parts == p["total_bytes"], name
    assert p["estimated_seconds"] > 0 and p["fits"]
  if parallelism == "mesh":  # FSDP: a quarter of the parameters per chip (norms aside)
    n = build.model_config(config).num_params() * 4
    assert 0.24 < d["phases"]["update"]["params_bytes"] / n < 0.3
    assert d["phases"]["update"]["collectives"]  # gathers / reductions exist
  else:
    assert d["phases"]["update"]["params_bytes"] == build.model_config(config).num_params() * 4
  assert d["fits"] and "FITS" in report.format_plan(d)


@needs_libtpu
def test_llama_8b_float32_under_pmap_does_not_fit_v5e_8():
  sys.path.insert(0, str(ROOT / "configs"))
  import gsm8k
  config = gsm8k.get_config()
  config.update(model_path="preset:llama3.1-8b", dtype="float32", parallelism="pmap")
  s = topology.parse("v5e-8")
  d = report.plan_dict(programs.compile_plan(config, s.devices(), limit=s.memory_limit()), s, config)
  assert not d["fits"]
  assert d["peak_bytes"] > 16 * 8.03e9  # actor + AdamW alone, 16 bytes per parameter
  assert "DOES NOT FIT" in report.format_plan(d)


@needs_libtpu
def test_plan_command_prints_its_table(tmp_path):
  out = tmp_path / "plan.json"
  proc = subprocess.run(
      [sys.executable, "-m", "grpo_jax.plan", "--topology=v5e-4", "--config.max_steps=3",
       "--config.parallelism=mesh", "--config.mesh.fsdp=2", "--config.mesh.data=2",
       f"--json={out}"], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh data=2 fsdp=2 tensor=1" in proc.stdout and "FITS" in proc.stdout
  assert json.loads(out.read_text())["chips"] == 4
  bad = subprocess.run([sys.executable, "-m", "grpo_jax.plan", "--topology=v5e-3"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith(
      "grpo_jax.plan: error: ")


@pytest.mark.slow  # compiles every layout; the default run compiles them in the tests above
@needs_libtpu
def test_suggest_names_the_fastest_layout_that_fits():
  from grpo_jax.plan import suggest
  config = _demo_config(parallelism="mesh")
  best, tried = suggest.suggest(config, topology.parse("v5e:2x2"))
  assert len(tried) >= 3 and best in tried and best["fits"]
  assert best["estimated_step_seconds"] == min(d["estimated_step_seconds"] for d in tried
                                               if d["fits"])
  layouts = {d["layout"] for d in tried}
  assert {"mesh data=1 fsdp=4 tensor=1", "mesh data=2 fsdp=2 tensor=1", "pmap x4"} <= layouts
  assert best["flags"] in suggest.format_suggestion(best, tried)


@pytest.mark.parametrize("message, temp_gib", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (20.02G) exceeds available HBM (15.75G).", 20.02),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
     "hbm. Used 45.50G of 15.75G hbm. Exceeded hbm capacity by 29.75G.", 45.50 - 3.0)])
def test_a_refused_program_is_sized_from_what_xla_says(message, temp_gib):
  resident, batch = 2 * 2**30, 2**30  # 3 GiB of the "Used" figure are the arguments
  phase = programs._out_of_memory("update", RuntimeError(message), 1.0, 0.0, 0.0, batch,
                                  resident)
  assert phase.out_of_memory and abs(phase.temp_bytes / 2**30 - temp_gib) < 0.01
  assert phase.total(resident) == resident + batch + phase.temp_bytes


def _lora_config(base_dtype="bfloat16", quantization="nf4", rank=8, **changes):
  sys.path.insert(0, str(ROOT / "configs"))
  import gsm8k
  c = gsm8k.get_config()  # bfloat16 compute
  c.update(model_path="preset:smollm2-135m", **changes)
  c.mesh.update(data=1, fsdp=4)
  c.lora.update(rank=rank, base_dtype=base_dtype, base_quantization=quantization)
  return c


def _leaf_names(tree) -> set[str]:
  from grpo_jax.layouts import mesh as mesh_lib
  return {mesh_lib._path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


@needs_libtpu
def test_lora_state_of_a_preset_trains_adapters_on_one_quantised_base():
  devices = topology.parse("v5e:2x2").devices()
  # float32 compute: a bfloat16 one would narrow a float32 base to bfloat16 where it is
  # placed (grpo.as_reference), as the loop does
  on_mesh = dict(parallelism="mesh", dtype="float32")
  full = programs.resident_state(_lora_config(rank=0, **on_mesh), devices)
  full_opt = full.bytes(full.state_s.opt_state)
  bases = {}
  for base_dtype, quantization in [("float32", "none"), ("bfloat16", "none"),
                                   ("bfloat16", "int8"), ("bfloat16", "nf4")]:
    c = _lora_config(base_dtype, quantization, **on_mesh)
    s = programs.resident_state(c, devices)
    # the trainable params and the optimizer's moments are the adapters alone
    assert _leaf_names(s.params_s) and all(n.endswith(("lora_a", "lora_b"))
                                           for n in _leaf_names(s.params_s))
    opt = s.bytes(s.state_s.opt_state)
    assert 0 < opt < 0.05 * full_opt, (opt, full_opt)
    # the reference is the base itself (the plain model's leaves, no adapters): no copy
    assert not any("lora" in n for n in _leaf_names(s.reference_s))
    assert s.layout.step.uses_lora
    bases[quantization if quantization != "none" else base_dtype] = s.bytes(s.reference_s)
    if quantization != "none":
      assert any(n.endswith("q_proj/kernel/qvalue") for n in _leaf_names(s.reference_s))
  assert bases["nf4"] < bases["int8"] < bases["bfloat16"] < bases["float32"], bases
  assert bases["float32"] == 2 * bases["bfloat16"]  # everything is floating there


@needs_libtpu
def test_nf4_base_counts_half_a_byte_per_weight():
  c = _lora_config("bfloat16", "nf4", parallelism="pmap")
  s = programs.resident_state(c, topology.parse("v5e:2x2").devices())
  cfg = s.cfg
  d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, \
      cfg.num_kv_heads * cfg.head_dim
  kernels = cfg.num_layers * (d * (q + 2 * kv) + q * d + 3 * d * f)
  others = cfg.num_params() - kernels
  # replicated per chip: 4 bits a weight, a bfloat16 scale per 64 input rows, the rest bf16
  assert s.bytes(s.reference_s) == kernels // 2 + 2 * kernels // 64 + 2 * others


@needs_libtpu
@pytest.mark.parametrize("parallelism", ["mesh", "pmap"])
def test_lora_programs_compile_for_v5e_2x2(parallelism):
  config = _demo_config(parallelism=parallelism)
  config.mesh.update(data=1, fsdp=4)
  config.lora.update(rank=4, base_dtype="bfloat16", base_quantization="nf4")
  s = topology.parse("v5e:2x2")
  plan = programs.compile_plan(config, s.devices(), limit=s.memory_limit())
  d = report.plan_dict(plan, s, config)
  lo = d["lora"]
  assert (lo["rank"], lo["quantization"], lo["base_dtype"]) == (4, "nf4", "bfloat16")
  assert lo["adapter_bytes"] == plan.params and lo["base_bytes"] == plan.reference
  assert 0 < lo["adapter_params"] < 0.1 * lo["base_params"]
  assert lo["xla_base_bytes"] >= lo["base_bytes"]  # (a tiny model's arrays are tile-padded)
  for name, p in d["phases"].items():
    parts = (p["params_bytes"] + p["optimizer_bytes"] + p["reference_bytes"] + p["temp_bytes"]
             + p["other_bytes"])
    assert parts == p["total_bytes"] and p["fits"], name
  # the sampler reads the base and the adapters; the update the base too (it is passed)
  phases = plan.phases
  assert phases["sampler"].argument_bytes >= plan.reference + plan.params
  assert phases["update"].argument_bytes >= plan.reference + plan.params + plan.optimizer
  text = report.format_plan(d)
  assert "LoRA rank 4" in text and "nf4" in text and "is the reference (one copy)" in text
  assert "base = ref" in text and "FITS" in text
