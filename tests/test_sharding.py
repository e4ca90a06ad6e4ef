"""Online learning on a device mesh: data and neuron parallelism equal one device.

The cases run in a fresh process with 4 virtual CPU devices (tests/sharding_cases.py: the XLA
flag must be set before JAX starts). For LIF, ALIF, a 3-layer GRU and a sparse recurrent net,
D-RTRL and ES-D-RTRL:

* data parallel (``online_gradients(..., mesh=Mesh(4 devices, 'data'))``) and data + neuron
  parallel (``DiagParamDimAlgorithm(net, mesh=Mesh(2x2, ('data', 'model')))``, stepped with
  ``brainstate`` grad) give the single-device gradients (rel < 1e-5);
* after the run every trace array and hidden state is still placed as the IR says (its
  ``{shard=[...]}``), and holds 1/D of its bytes per device along the sharded axes;
* XLA's memory analysis of one step: per-device trace and output bytes are 1/4 of one
  device's on four devices (data parallel).

The IR side (pass options, printing, verifier errors) is tested in this process.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import brainscale
import models

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def cases():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_cases.py")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    return {"memory": lines[0]["memory"], "windows": lines[1]["windows"],
            "results": [l for l in lines[2:] if not l.get("zoo")],
            "zoo": [l for l in lines[2:] if l.get("zoo")]}


def test_every_case_equals_one_device(cases):
    results = cases["results"]
    assert len(results) == 16
    for r in results:
        assert r["err"] < 1e-5, (r["name"], r["algo"], r["mesh"], r["err"])


def test_traces_and_states_stay_placed_as_the_ir_says(cases):
    results = cases["results"]
    for r in results:
        ndev = {("data",): 4, ("data", "model"): 4}[tuple(r["mesh"])]
        for aid, t in r["traces"].items():
            assert t["placed"] == t["ir"], (r["name"], aid, t)
            split = 1
            for ax in t["ir"]:
                split *= {"data": 4 if r["mesh"] == ["data"] else 2, "model": 2, None: 1}[ax]
            assert t["device_bytes"] * split == t["bytes"], (r["name"], aid, t)
            assert "data" in t["ir"]                           # the batch axis is split
            assert f"array {aid} =" in r["ir"] and "shard=[" in r["ir"]
        assert all(spec[0] == "data" for spec in r["hidden"].values())
        if r["mesh"] == ["data", "model"]:
            # neuron parallel: hidden states and eps_f / dense-weight traces split over 'model'
            assert all(spec[-1] == "model" for spec in r["hidden"].values()), r["hidden"]
            assert any("model" in t["ir"] for t in r["traces"].values())
            assert ndev == 4


def test_dense_weights_are_split_over_the_neuron_axis(cases):
    results = cases["results"]
    (r,) = [r for r in results if r["name"] == "lif" and r["algo"] == "param"
            and r["mesh"] == ["data", "model"]]
    assert r["weights"]["syn"] == [["model"], [None, "model"]]         # bias, weight columns
    (r,) = [r for r in results if r["name"] == "sparse" and r["algo"] == "param"
            and r["mesh"] == ["data", "model"]]
    # the bias splits with the neurons, the stored synapses over the same axis when they divide
    (nse,) = r["nse"].values()
    assert r["weights"]["syn"] == [["model"], ["model" if nse % 2 == 0 else None]]


def test_per_device_memory_is_one_quarter(cases):
    mem = cases["memory"]
    one, four = mem["1"], mem["4"]
    assert four["traces"] * 4 == one["traces"]
    assert four["output"] <= 0.3 * one["output"]
    assert four["argument"] < 0.4 * one["argument"]


def test_shard_pass_in_the_ir_and_its_errors():
    net, x0 = models.make("lif_delta", 4)
    pipe = [*brainscale.DEFAULT_PIPELINE, "shard{mesh=[data=2;model=5],batch=data,neurons=model}"]
    learner = brainscale.DiagParamDimAlgorithm(net, pipeline=pipe).compile_graph(x0)
    text = learner.ir()
    assert "mesh=[data:2,model:5]" in text
    assert "hidden %V : f32[4,5]" in text and "{shard=[data,model]}" in text
    assert "array T0.1 = eps(R0 -> G0, leaf=weight, state=%V) : f32[4,8,5]  {shard=[data,.,model]}" \
        in text
    with pytest.raises(brainscale.PipelineError, match="not an axis of the mesh"):
        brainscale.DiagParamDimAlgorithm(models.make("lif_delta", 4)[0], pipeline=[
            *brainscale.DEFAULT_PIPELINE, "shard{mesh=[data=2],batch=rows}"]).compile_graph(x0)
    # a dimension that does not divide stays replicated, with a note
    net, x0 = models.make("lif_delta", 4)
    pipe = [*brainscale.DEFAULT_PIPELINE, "shard{mesh=[data=3],batch=data}"]
    learner = brainscale.DiagParamDimAlgorithm(net, pipeline=pipe).compile_graph(x0)
    assert any("does not divide over data=3" in m for _, m in learner.log)
    # a user pass that shards wrongly is caught by the verifier
    import dataclasses
    g = learner.graph
    bad = g.replace(hidden=tuple(dataclasses.replace(h, sharding=("data",)) for h in g.hidden))
    with pytest.raises(brainscale.IRVerificationError, match="sharding"):
        brainscale.verify(bad)


def test_mesh_option_errors():
    net, x0 = models.make("lif_delta", 4)

    class FakeMesh:
        axis_names = ("rows",)
        shape = {"rows": 2}
    with pytest.raises(brainscale.BrainscaleError, match="batch_axis"):
        brainscale.DiagParamDimAlgorithm(net, mesh=FakeMesh()).compile_graph(x0)
    with pytest.raises(brainscale.BrainscaleError, match="need mesh"):
        brainscale.DiagParamDimAlgorithm(net, batch_axis="data").compile_graph(x0)
    with pytest.raises(brainscale.PipelineError, match="'jax' and 'jax-zoo' backends; backend 'pallas' does not"):
        brainscale.DiagParamDimAlgorithm(net, mesh=FakeMesh(), batch_axis="rows",
                                         backend="pallas").compile_graph(x0)
    assert np.shape(x0) == (4, 3) and jnp is not None


def test_docs_quote_the_printed_ir(cases):
    import pathlib
    import re
    results = cases["results"]
    (r,) = [r for r in results if r["name"] == "lif" and r["algo"] == "param"
            and r["mesh"] == ["data", "model"]]
    text = (pathlib.Path(HERE).parent / "docs" / "distributed.md").read_text()
    quoted = re.search(r"```text\n(graph @LIFDeltaNet.*?)```", text, flags=re.S).group(1)
    for line in quoted.strip().splitlines():
        assert line in r["ir"], line


def test_chunked_and_multi_step_windows_on_a_mesh(cases):
    """online_gradients(chunk=3), a vjp_method='multi-step' window and train_online (the
    weights it leaves), data parallel."""
    assert set(cases["windows"]) == {"chunk", "multi-step", "train"}
    for how, r in cases["windows"].items():
        assert r["err"] < 1e-5, (how, r)
        assert all(sp[0] == "data" for sp in r["specs"]), (how, r)


def test_the_rule_zoo_on_a_data_parallel_mesh(cases):
    """RTRL (influence blocks m), e-prop with the kappa filter (eps_bar) and UORO (u_h, u_p)
    on 4 devices equal one device; every array is split over the batch as the IR says."""
    zoo = cases["zoo"]
    assert sorted((r["name"], r["algo"]) for r in zoo) == [("alif", "eprop_k"), ("alif", "uoro"),
                                                            ("lif", "rtrl")]
    roles = set()
    for r in zoo:
        assert r["err"] < 1e-5, (r["name"], r["algo"], r["err"])
        for aid, t in r["traces"].items():
            assert t["placed"] == t["ir"] and t["ir"][0] == "data", (r["name"], aid, t)
            assert t["device_bytes"] * 4 == t["bytes"], (r["name"], aid, t)
        roles |= set(re.findall(r"= (m|u_h|u_p|eps_bar)\(", r["ir"]))
    assert roles == {"m", "u_h", "u_p", "eps_bar"}
