"""An HF MoE model under ParallelModel(compile=True): DeepSeek-V3's block (MLA attention, sigmoid routing over
expert groups with a score bias and a routed scale, a shared expert) compiled fullgraph=True under sp/ep gives HF's
own loss and gradients. One MoE layer: the compile costs most of the test's time."""
import pytest

pytest.importorskip("transformers")

from hf_harness import forced_plan, run_threads  # noqa: E402


def test_compiled_deepseek_v3_ep_equals_hf():
    over = dict(num_hidden_layers=1, first_k_dense_replace=0)
    graph, plan = forced_plan("deepseek_v3", {"attention": "sp", "moe": "ep"}, **over)
    assert run_threads("deepseek_v3", graph, plan, compile=True, **over) == []
