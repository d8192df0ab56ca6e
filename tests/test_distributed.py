"""Sharded statistics equal the single-device ones: 8 simulated CPU devices over several mesh
shapes, and 2 processes through jax.distributed on 127.0.0.1 (each in subprocesses)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

WORKER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import jax
    if len(sys.argv) > 2:  # process id, coordinator port
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from hcnr_jax.sharding import initialize_distributed
        initialize_distributed(f"127.0.0.1:{{sys.argv[3]}}", 2, int(sys.argv[2]))
    import numpy as np, tiny, hcnr_jax
    from hcnr_jax import stats
    from hcnr_jax.params import unflatten
    from hcnr_jax.sharding import make_mesh
    from hcnr_jax.stats import StatsOptions
    from test_stats import random_samples
    model = tiny.hf_model("qwen2", num_hidden_layers=2)
    flat = {{k: v.detach().numpy() for k, v in model.state_dict().items()}}
    cfg = hcnr_jax.config_from_hf(model.config.to_dict())
    params = unflatten(flat, cfg.num_layers)
    samples = random_samples(n=7, seed=5)
    out = {{}}
    for mesh in sys.argv[1].split(";"):
        f = stats.fisher(params, cfg, samples, StatsOptions(batch_size=4, mesh=make_mesh(mesh)))
        h = stats.hessian(params, cfg, samples, StatsOptions(batch_size=4, mesh=make_mesh(mesh), fsdp=True))
        out.update({{f"{{mesh}}|f|{{k}}": v for k, v in f.items()}})
        out.update({{f"{{mesh}}|h|{{k}}": v for k, v in h.items()}})
        if os.environ.get("LOADED"):  # the weights loaded straight onto the mesh, with the result cache
            from hcnr_jax.conversion import hf as hf_io
            m = make_mesh(mesh)
            hf_io.BYTES_READ[0] = 0
            loaded = hcnr_jax.load_pretrained(os.environ["LOADED"], mesh=m, fsdp=True).params
            out[f"{{mesh}}|bytes_read"] = np.array(hf_io.BYTES_READ[0])
            out[f"{{mesh}}|bytes_total"] = np.array(sum(x.nbytes for x in jax.tree.leaves(loaded)))
            f = stats.fisher(loaded, cfg, samples,
                             StatsOptions(batch_size=4, mesh=m, fsdp=True, cache_dir=os.environ["CACHE"]))
            out.update({{f"{{mesh}}|loaded|{{k}}": v for k, v in f.items()}})
    if jax.process_index() == 0:
        np.savez(os.environ["OUT"], **out)
""")


def _run(tmp_path: Path, meshes: str, devices: int, procs: int = 1, loaded: Path | None = None) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    out = tmp_path / f"out_{devices}_{procs}.npz"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "OUT": str(out),
           "JAX_PLATFORMS": "cpu"}
    if loaded is not None:
        env.update(LOADED=str(loaded), CACHE=str(tmp_path / "cache"))
    if procs == 1:
        res = subprocess.run([sys.executable, str(script), meshes], env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ps = [subprocess.Popen([sys.executable, str(script), meshes, str(i), str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(procs)]
        for p in ps:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
    return dict(np.load(out))


def _compare(got: dict, want: dict, mesh: str, ref_mesh: str = "data=1") -> None:
    keys = [k for k in want if k.startswith(ref_mesh + "|")]
    assert keys
    for k in keys:
        a, b = got[mesh + k[len(ref_mesh):]], want[k]
        err = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b)
        assert err <= 1e-6, (mesh, k, err)


def test_data_and_model_axes_on_4_devices(tmp_path):
    """The default-suite check: one mesh splitting both axes (fsdp Hessian too) against a
    single-device run in this process (one subprocess instead of two)."""
    import tiny
    from test_stats import random_samples

    import hcnr_jax
    from hcnr_jax import stats
    from hcnr_jax.params import unflatten
    from hcnr_jax.sharding import make_mesh
    from hcnr_jax.stats import StatsOptions

    model = tiny.hf_model("qwen2", num_hidden_layers=2)
    cfg = hcnr_jax.config_from_hf(model.config.to_dict())
    params = unflatten({k: v.detach().numpy() for k, v in model.state_dict().items()}, cfg.num_layers)
    samples = random_samples(n=7, seed=5)
    one_device = make_mesh("data=1")
    one = {f"data=1|f|{k}": v
           for k, v in stats.fisher(params, cfg, samples, StatsOptions(batch_size=4,
                                                                       mesh=one_device)).items()}
    one.update({f"data=1|h|{k}": v for k, v in stats.hessian(params, cfg, samples, StatsOptions(
        batch_size=4, mesh=one_device, fsdp=True)).items()})
    four = _run(tmp_path, "data=2,model=2", devices=4)
    _compare(four, one, "data=2,model=2")


def test_mesh_shapes_on_8_devices(tmp_path):
    one = _run(tmp_path, "data=1", devices=1)
    meshes = ["data=8", "data=2,model=4", "data=4,model=2", "model=8"]
    eight = _run(tmp_path, ";".join(meshes), devices=8)
    for m in meshes:
        _compare(eight, one, m)


def test_two_processes(tmp_path):
    """Also with the weights loaded straight onto the 2-process mesh, fsdp (each process places its
    own shards; the statistics step keeps them as they are; the cache key gathers them)."""
    import tiny

    one = _run(tmp_path, "data=1", devices=1)
    model = tiny.save_hf(tiny.hf_model("qwen2", num_hidden_layers=2), tmp_path / "model")
    two = _run(tmp_path, "data=2,model=2", devices=2, procs=2, loaded=model)
    _compare(two, one, "data=2,model=2")
    # Each process read only the rows its devices hold: less than the whole checkpoint.
    assert 0 < two["data=2,model=2|bytes_read"] < two["data=2,model=2|bytes_total"]
    loaded = {k.replace("|loaded|", "|f|"): v for k, v in two.items() if "|loaded|" in k}
    assert len(loaded) == len([k for k in one if k.startswith("data=1|f|")])
    _compare(loaded, {k: v for k, v in one.items() if "|f|" in k}, "data=2,model=2")


LOAD_WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import jax, ml_dtypes, numpy as np, tiny
    import hcnr_jax
    from hcnr_jax import sharding
    from hcnr_jax.params import flatten
    from test_gguf import write_tiny_gguf

    assert jax.device_count() == 8
    root = Path(sys.argv[1])
    gguf_model = tiny.hf_model("llama", rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                               tie_word_embeddings=False)
    sources = {{
        "qwen2": tiny.save_hf(tiny.hf_model("qwen2"), root / "qwen2"),
        "llama-sharded": tiny.save_hf(tiny.hf_model("llama"), root / "llama", max_shard_size="20KB"),
        "gguf": write_tiny_gguf(root / "tiny.gguf", {{k: v.detach().numpy() for k, v in gguf_model.state_dict().items()}},
                                gguf_model.config),
    }}
    cases = [("data=2,model=4", False, None), ("data=4,model=2", True, "bfloat16"), ("model=8", False, None)]
    split = 0
    for label, src in sources.items():
        ref = {{k: np.asarray(v) for k, v in flatten(hcnr_jax.load_pretrained(src).params).items()}}
        for spec, fsdp, dtype in cases:
            mesh = sharding.make_mesh(spec)
            got = hcnr_jax.load_pretrained(src, dtype=dtype, mesh=mesh, fsdp=fsdp)
            want = flatten(sharding.param_shardings(got.params, mesh, fsdp))
            for name, leaf in flatten(got.params).items():
                where = (label, spec, name)
                assert isinstance(leaf, jax.Array) and leaf.sharding == want[name], (where, leaf.sharding, want[name])
                split += any(ax is not None for ax in leaf.sharding.spec)
                expect = ref[name] if dtype is None else ref[name].astype(ml_dtypes.bfloat16)
                assert leaf.dtype == expect.dtype, where
                assert np.asarray(leaf).tobytes() == expect.tobytes(), where
                for shard in leaf.addressable_shards:
                    assert np.asarray(shard.data).tobytes() == np.ascontiguousarray(expect[shard.index]).tobytes(), where
    assert split > 150, split  # most tensors really are split, not replicated
    print("OK", split)
""")


def test_load_pretrained_onto_a_mesh_of_8_devices(tmp_path):
    """``load_pretrained(..., mesh=)`` places each parameter in its sharding by role as it is read
    (HF directory, sharded HF directory, GGUF; with a dtype cast; fsdp): the shardings are
    ``param_shardings``' and every shard holds the right slice of the unsharded load."""
    script = tmp_path / "load_worker.py"
    script.write_text(LOAD_WORKER.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("OK"), res.stdout
