"""Bad input raises ValueError/TypeError naming the argument at fault."""

import pytest
import torch

from flux_engine.ops import ExpertLoRA, dequantize, expert_counts, grouped_mlp, permute, quantize, route

T, H, I, E, K = 6, 8, 4, 4, 2


def mlp_args(**overrides):
    args = dict(
        x=torch.randn(T, H),
        gate_up=torch.randn(E, 2 * I, H),
        down=torch.randn(E, H, I),
        topk_weights=torch.rand(T, K),
        topk_ids=torch.randint(0, E, (T, K)),
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,error,name",
    [
        (dict(x=torch.randn(T, H, 1)), ValueError, "x"),
        (dict(gate_up=torch.randn(E, 2 * I, H + 1)), ValueError, "gate_up"),
        (dict(down=torch.randn(E + 1, H, I)), ValueError, "down"),
        (dict(down=torch.randn(E, H, I + 1)), ValueError, "gate_up"),
        (dict(topk_ids=torch.full((T, K), E)), ValueError, "topk_ids"),
        (dict(topk_ids=torch.full((T, K), -1)), ValueError, "topk_ids"),
        (dict(topk_ids=torch.rand(T, K)), TypeError, "topk_ids"),
        (dict(topk_weights=torch.ones(T, K, dtype=torch.int64)), TypeError, "topk_weights"),
        (dict(topk_weights=torch.rand(T, K + 1)), ValueError, "topk_weights"),
        (dict(topk_ids=torch.randint(0, E, (T + 1, K)), topk_weights=torch.rand(T + 1, K)), ValueError, "topk_ids"),
        (dict(x=torch.randint(0, 3, (T, H))), TypeError, "x"),
        (dict(gate_up=torch.randn(E, 2 * I, H, dtype=torch.float64)), TypeError, "gate_up"),
        (dict(x=[[0.0]]), TypeError, "x"),
        (dict(expert_map=torch.tensor([0, 1, 2, 4])), ValueError, "expert_map"),
        (dict(expert_map=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "expert_map"),
        (dict(topk_ids=torch.full((T, K), 2), expert_map=torch.tensor([0, 1])), ValueError, "topk_ids"),
    ],
)
def test_grouped_mlp_rejects(overrides, error, name):
    with pytest.raises(error, match=name):
        grouped_mlp(**mlp_args(**overrides))


def test_grouped_mlp_rejects_mixed_devices():
    meta_down = torch.randn(E, H, I, device="meta")
    with pytest.raises(ValueError, match="down is on meta"):
        grouped_mlp(**mlp_args(down=meta_down))


def test_grouped_mlp_rejects_bad_lora():
    base = dict(slots=torch.full((E,), -1), gate_up_A=torch.randn(2, 3, H), gate_up_B=torch.randn(2, 2 * I, 3))
    bad = [
        (dict(base, gate_up_B=torch.randn(2, 2 * I, 4)), "gate_up_B"),
        (dict(base, gate_up_A=torch.randn(2, 3, H + 1)), "gate_up_A"),
        (dict(base, gate_up_B=None), "gate_up_B must be given together"),
        (dict(base, slots=torch.full((E + 1,), -1)), "lora.slots"),
        (dict(base, slots=torch.tensor([0, 2, -1, -1])), "lora.slots"),
        (dict(slots=torch.full((E,), -1)), "no factors"),
    ]
    for fields, name in bad:
        with pytest.raises(ValueError, match=name):
            grouped_mlp(**mlp_args(), lora=ExpertLoRA(**fields))
    with pytest.raises(TypeError, match="lora"):
        grouped_mlp(**mlp_args(), lora={"slots": base["slots"]})
    shared = ExpertLoRA(torch.tensor([0, -1, -1, -1]), base["gate_up_A"], base["gate_up_B"])
    with pytest.raises(ValueError, match="lora.slots: a physical expert shared"):
        grouped_mlp(**mlp_args(expert_map=torch.tensor([0, 0, 1, 2])), lora=shared)


def test_route_rejects():
    with pytest.raises(ValueError, match="k=5 exceeds"):
        route(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="logits"):
        route(torch.randn(3, 4, 1), 2)
    with pytest.raises(TypeError, match="logits"):
        route(torch.ones(3, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="k must"):
        route(torch.randn(3, 4), 0)
    with pytest.raises(ValueError, match="scoring"):
        route(torch.randn(3, 4), 2, scoring="tanh")


def test_expert_counts_rejects():
    ids = torch.randint(0, 4, (5, 2))
    with pytest.raises(ValueError, match="topk_ids"):
        expert_counts(ids, 3)
    with pytest.raises(ValueError, match="weights"):
        expert_counts(ids, 4, torch.rand(4))
    with pytest.raises(TypeError, match="weights"):
        expert_counts(ids, 4, torch.ones(5, dtype=torch.int32))
    with pytest.raises(TypeError, match="out"):
        expert_counts(ids, 4, out=torch.zeros(4))
    with pytest.raises(ValueError, match="out"):
        expert_counts(ids, 4, out=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_experts"):
        expert_counts(ids, 0)


def test_permute_rejects():
    ids = torch.randint(0, 4, (5, 2))
    with pytest.raises(ValueError, match="expert_map"):
        permute(ids, 2, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="topk_ids"):
        permute(ids, 2, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="topk_ids"):
        permute(ids.float(), 4)


def test_quantize_rejects():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(4, 64), bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(4, 96), bits=4, group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(4, 96), bits=4, group_size=3)
    with pytest.raises(TypeError, match="w"):
        quantize(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="q"):
        dequantize(torch.randn(4, 64))
