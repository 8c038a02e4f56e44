"""train/perf.py: model FLOPs, the peak table, and DeepSpeed's op builds under Hopper arch lists."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import TINY_RESNET, TINY_VIT
from train.perf import deepspeed_arch_list, parseable_arch_list, peak_tflops, train_flops_per_image


def test_deepspeed_builds_its_fused_adam_under_hopper_arch_lists(monkeypatch):
    """DeepSpeed's CUDA op builder (the one deepspeed.initialize JIT-builds fused Adam with) fails on
    the stock Hopper TORCH_CUDA_ARCH_LIST; handed the parseable list, it computes its flags, and the
    user's value is back afterwards."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    builder = FusedAdamBuilder()
    builder.jit_mode = True
    for value in ("9.0a", "8.0;9.0a 9.0+PTX", "10.0f;9.0a"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
        with pytest.raises(ValueError, match="invalid literal for int"):
            builder.compute_capability_args()
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
        with deepspeed_arch_list():
            builder.compute_capability_args()
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == value
    assert parseable_arch_list("9.0a;8.0 9.0+PTX 10.0f") == "9.0;8.0;9.0+PTX;10.0"
    assert parseable_arch_list("8.6") == "8.6"


def test_train_flops_per_image_counts_every_matmul_and_leaves_the_model_alone():
    from transformers import AutoConfig, AutoModelForImageClassification

    vit = AutoModelForImageClassification.from_config(AutoConfig.for_model(**TINY_VIT, num_labels=4))
    # by hand, per image: patch embedding 16 x 192 x 32 x 2; per layer q, k, v, o and the MLP
    # (17 tokens), scores and values (2 heads of 16); classifier; backward twice the forward, but
    # the patch embedding has no input gradient
    tokens, hidden, mlp, layers = 17, 32, 64, 2
    embed = 16 * 192 * hidden * 2
    layer = 4 * tokens * hidden * hidden * 2 + 2 * (2 * tokens * tokens * 16 * 2) + 2 * tokens * hidden * mlp * 2
    forward = embed + layers * layer + hidden * 4 * 2
    assert train_flops_per_image(vit, image_size=(32, 32), num_classes=4) == 3 * forward - embed
    assert vit.config._attn_implementation == "sdpa" and all(p.grad is None for p in vit.parameters())

    resnet = AutoModelForImageClassification.from_config(AutoConfig.for_model(**TINY_RESNET, num_labels=4))
    stats = {n: b.clone() for n, b in resnet.named_buffers()}
    assert train_flops_per_image(resnet, image_size=(32, 32), num_classes=4) > 0
    assert all(torch.equal(stats[n], b) for n, b in resnet.named_buffers())  # BatchNorm statistics untouched


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA H200", "bf16", 989.0), ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("NVIDIA L40S", "bf16", 362.0),
    ("Tesla V100-SXM2-32GB", "fp16", 125.0), ("Tesla V100-PCIE-16GB", "fp32", 14.0), ("Tesla V100-SXM2-32GB", "bf16", None),
    ("Tesla T4", "fp16", 65.0), ("NVIDIA L4", "bf16", 121.0), ("NVIDIA A10", "fp16", 125.0), ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
    ("NVIDIA A10G", "bf16", None), ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_deepspeeds_cpu_builders_ask_py_cpuinfo_once_per_kind_of_machine(monkeypatch, tmp_path):
    """DeepSpeed's CPU op builders call py-cpuinfo (a new interpreter each time) for their -march
    and SIMD flags whenever they load an op; under cpu_info_once the first answer is kept in the
    extension build root and read from there, by this process and the next; another kind of CPU
    asks again."""
    import cpuinfo
    from deepspeed.ops.op_builder.cpu.fused_adam import FusedAdamBuilder  # a CPU accelerator's

    from train import perf

    asked = []
    real = cpuinfo.get_cpu_info

    def counted():
        asked.append(1)
        return real()

    monkeypatch.setattr(cpuinfo, "get_cpu_info", counted)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    builder = FusedAdamBuilder()
    flags = builder.cxx_args()  # asks twice (-march, SIMD width), as in deepspeed.initialize
    assert len(asked) == 2
    with perf.cpu_info_once():
        assert builder.cxx_args() == flags and len(asked) == 3
    kept = list(tmp_path.glob("cpuinfo-*.json"))
    assert [p.name for p in kept] == [f"cpuinfo-{perf.cpu_kind()}.json"] and cpuinfo.get_cpu_info is counted
    with perf.cpu_info_once():  # a later run on this machine: from the file
        assert builder.cxx_args() == flags and len(asked) == 3
    monkeypatch.setattr(perf, "cpu_kind", lambda: "another")
    with perf.cpu_info_once():
        assert builder.cxx_args() == flags and len(asked) == 4
    assert (tmp_path / "cpuinfo-another.json").is_file()


MUON_SCRIPT = """
import json, sys
import torch
from deepspeed.runtime import compiler
from train.perf import defer_muon_compile

if sys.argv[1] == "deferred":
    defer_muon_compile()
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam  # what every ZeRO engine imports
import deepspeed.runtime.zero.muon.original_muon as muon
seen = {"inductor": "torch._inductor.compile_fx" in sys.modules, "compile_restored": compiler.compile() is torch.compile}
torch._dynamo.config.disable = True  # torch.compile's function runs eagerly: no kernel build on a CPU
g = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
kernel = muon.zeropower_via_newtonschulz5
seen["first_call_same"] = torch.equal(kernel(g, 2), getattr(kernel, "__wrapped__", kernel)(g, 2))
seen["inductor_after_call"] = "torch._inductor.compile_fx" in sys.modules
print(json.dumps(seen))
"""


@pytest.mark.parametrize("how", ["at_import", "deferred"])
def test_deepspeeds_muon_kernels_meet_torch_compile_at_their_first_call(how):
    """Every ZeRO engine imports DeepSpeed's Muon optimizer, whose kernels are decorated with
    torch.compile at import, and torch.compile's first use imports inductor (1.6 s of CPU per rank,
    measured). After defer_muon_compile the import leaves inductor alone and DeepSpeed's
    compiler.compile as it was; a kernel goes through torch.compile at its first call, computing
    what the kernel computes."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-c", MUON_SCRIPT, how], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["compile_restored"] and seen["first_call_same"] and seen["inductor_after_call"], seen
    assert seen["inductor"] == (how == "at_import"), seen  # DeepSpeed's own way imports it: what this is for
