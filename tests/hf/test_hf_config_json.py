"""`meshplan trace|plan|simulate` on an HF config.json: the model is built on the meta device and adapted."""
import json

import pytest

pytest.importorskip("transformers")

from meshplan.cli import main  # noqa: E402
from meshplan.hf.config_json import meta_model, trace_config  # noqa: E402

TINY_QWEN3 = {"model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64,
              "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
              "max_position_embeddings": 512, "torch_dtype": "bfloat16", "norm_topk_prob": True}


@pytest.fixture
def config_json(tmp_path):
    path = tmp_path / "tiny-qwen3" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY_QWEN3))
    return path


def test_meta_model_holds_no_memory_and_counts_parameters(config_json):
    front = meta_model(config_json)
    assert all(p.is_meta for p in front.parameters())
    assert next(front.parameters()).dtype.is_floating_point and str(next(front.parameters()).dtype) == "torch.bfloat16"
    graph, cfg = trace_config(config_json)
    expected = sum(p.numel() for p in front.hf_model.parameters())
    assert graph.total_params == expected and graph.name == "tiny-qwen3" and cfg.max_seq_len == 512


def test_cli_trace_plan_simulate_accept_config_json(config_json, capsys):
    assert main(["trace", str(config_json), "--seq", "64"]) == 0
    assert "tiny-qwen3: " in capsys.readouterr().out
    assert main(["plan", str(config_json), "--cluster", "h100", "--gpus", "8", "--seq", "64",
                 "--global-batch", "16"]) == 0
    assert "layers.*.feed_forward" in capsys.readouterr().out
    assert main(["simulate", str(config_json), "--cluster", "h100", "--gpus", "8", "--seq", "64",
                 "--global-batch", "16"]) == 0


def test_cli_refuses_an_unsupported_attribute_in_one_line(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_QWEN3, "use_sliding_window": True, "sliding_window": 128}))
    assert main(["trace", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sliding_window" in err


def test_shipped_deepseek_v3_config_traces_mla_and_the_published_totals():
    # benchmarks/published.py prices DeepSeek-V3 from this file: 671B parameters without the MTP module
    # (arXiv 2412.19437, section 4.2), multi-head latent attention as released, 3 dense layers
    from pathlib import Path

    import meshplan
    from meshplan.ir import graph as G

    path = Path(meshplan.__file__).parent / "configs" / "hf" / "deepseek-v3" / "config.json"
    graph, _ = trace_config(path, 4096)
    assert round(graph.total_params / 1e9, 1) == 671.0
    attn = [op for op in graph.ops() if op.kind == G.ATTENTION]
    assert len(attn) == 61 and all(op.attrs.get("mla") for op in attn)
    a = attn[0].attrs
    assert (a["q_lora_rank"], a["kv_lora_rank"], a["qk_rope_head_dim"], a["v_head_dim"]) == (1536, 512, 64, 128)
    assert sum(op.kind == G.MOE for op in graph.ops()) == 58
