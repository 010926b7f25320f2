"""refresh_tables: state-fed buffers take the state's current values; the graph is not rewritten."""

from __future__ import annotations

import torch
from helpers import calib_set, denoiser_inputs

import stepq
from stepq.compiler.pass_manager import run_passes
from stepq.compiler.state import TimestepTable
from stepq.passes import AttachTimestepTables, RefreshTables
from stepq.passes.refresh_tables import state_fed_buffers
from stepq.testing.random_models import RandomDenoiserConfig, build_random_denoiser

T = 1000


def _tables(names, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: TimestepTable(torch.rand(T, generator=g) * 0.1 + 0.01, torch.randint(0, 256, (T,), generator=g).float())
            for n in names}


def _attached(seed):
    m = build_random_denoiser(RandomDenoiserConfig(kind="unet", depth=1))
    data = calib_set(2)
    prog = stepq.calibrate(stepq.prepare(stepq.capture(m, data[0]), "w8a8"), data, progress=False)
    prog.state.timestep_tables = _tables(sorted(prog.state.activation_stats), seed)
    run_passes(prog, [AttachTimestepTables()])
    return prog


def test_counts_the_buffers_written_and_matches_a_fresh_attach():
    prog = _attached(seed=0)
    fresh = _attached(seed=1)
    x = denoiser_inputs(3, (5, 400, 999), seed=2)
    assert run_passes(prog, [RefreshTables()])[0].result.count == 0  # buffers equal the state
    names = sorted(prog.state.timestep_tables)
    changed = names[:2]
    new = _tables(names, seed=1)
    for n in changed:
        prog.state.timestep_tables[n] = new[n]
    nodes_before = [str(n) for n in prog.gm.graph.nodes]
    assert run_passes(prog, [AttachTimestepTables()])[0].result.count == 0  # rewrites only
    res = run_passes(prog, [RefreshTables()])[0].result
    assert res.count == 2 * len(changed)  # a scale and a zero-point table each
    assert all(d.endswith("<- timestep_tables") for d in res.details)
    assert [str(n) for n in prog.gm.graph.nodes] == nodes_before
    assert run_passes(prog, [RefreshTables()])[0].result.count == 0
    # every quantizer's tables refreshed: the program computes what one attached to those tables does
    prog.state.timestep_tables = new
    assert run_passes(prog, [RefreshTables()])[0].result.count == 2 * (len(names) - len(changed))
    assert torch.equal(prog(**x), fresh(**x))


def test_lists_every_state_fed_buffer_once():
    prog = _attached(seed=0)
    listed = [name for name, _, _ in state_fed_buffers(prog)]
    assert len(listed) == len(set(listed)) == 2 * len(prog.state.timestep_tables)
    assert all(prog.gm.get_buffer(n).shape == (T,) for n in listed)
