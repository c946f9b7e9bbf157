"""The planner computes the parts its candidates share once per search: the picks and predictions stay those of
predicting each candidate alone."""

from __future__ import annotations

import pytest

from cosmos3_offload.loading.components import model_configs
from cosmos3_offload.loading.sizes import model_sizes
from cosmos3_offload.planning.parallel import ParallelLayout
from cosmos3_offload.planning.request import DeviceProfile, Request
from cosmos3_offload.planning.search import TIME_TOLERANCE, candidates, choose_plan, predict
from cosmos3_offload.planning.timing import moved_bytes
from cosmos3_offload.units import GIB


@pytest.mark.parametrize(
    ("budget", "mapped", "ranks", "preview"),
    [(8, False, 1, 0), (8, True, 1, 0), (7, False, 1, 3), (24, False, 1, 0), (6, False, 2, 0)],
)
def test_the_search_picks_what_predicting_each_candidate_alone_picks(budget, mapped, ranks, preview):
    """Fails when a part shared across candidates is remembered under the wrong key (another placement's step
    time, another grid's decode, another chunk's activations), so the pick or its prediction drifts."""
    transformer, vae = model_configs(None, "nano")
    sizes = model_sizes(transformer, vae, dtype_bytes=2)
    layout = ParallelLayout.for_ranks(ranks, guidance=True, cfg_parallel="auto")
    request = Request.for_video(189, 720, 1280, parallel=layout, preview_frames=preview)
    profile = DeviceProfile()
    choice = choose_plan(sizes, request, budget * GIB, profile, mapped=mapped)

    fresh = model_sizes(transformer, vae, dtype_bytes=2)  # no memo shared with the search above
    alone = [(p, predict(p, fresh, request, profile)) for p in candidates(fresh, mapped=mapped, keep_vae=preview > 0)]
    fitting = [(p, q) for p, q in alone if q.peak <= budget * GIB * profile.headroom]
    fastest = min(q.times.total for _, q in fitting)
    tied = [(p, q) for p, q in fitting if q.times.total <= fastest * (1 + TIME_TOLERANCE)]
    plan, prediction = min(tied, key=lambda c: (moved_bytes(c[0], fresh, request), c[1].peak))
    assert choice.plan == plan
    assert choice.prediction == prediction
