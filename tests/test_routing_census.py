"""benchmarks/routing_census.py: the distinct-expert count it keeps on the device equals the routing the
LLM records, layer by layer, and it leaves the model as it found it."""
import torch

from benchmarks.routing_census import RoutingCensus
from models import build, tiny_config


def test_census_counts_the_distinct_experts_each_layer_routed_to():
    cfg = tiny_config()
    model = build(cfg, seed=0)
    llm = model.llm
    torch.manual_seed(1)
    calls = []
    census = RoutingCensus(model)
    with torch.no_grad(), census.counting():
        for rows in (2, 5):  # two calls of different sizes: the census averages per call
            x = torch.randn(rows, 1, cfg.llm.hidden_size)
            past_k, past_v = llm.empty_cache(rows)
            mask = torch.ones(rows, 1, dtype=torch.long)
            pos = torch.zeros(rows, 1, dtype=torch.long)
            rec = {}
            llm(x, mask, pos, past_k, past_v, moe_mode="loop", record=rec)
            calls.append([len(torch.unique(idx)) for idx in rec["topk_idx"]])
    want = [sum(c[i] for c in calls) / len(calls) for i in range(len(calls[0]))]
    got = census.mean_distinct()
    assert len(got) == len(census.moes) == len(want) > 0
    assert got == want
    assert any(c[i] > cfg.llm.num_experts_per_tok for c in calls for i in range(len(c)))  # rows did not all agree
    assert all("route" not in vars(m) for m in census.moes)  # the method is back
    census.reset()
    assert torch.isnan(torch.tensor(census.mean_distinct())).all()
