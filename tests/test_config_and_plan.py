from __future__ import annotations

import json

import pytest

import fptq_compile as fptq
from fptq_compile.plan import ActivationClass, ActivationGroup, ActivationSpec, QuantPlan


@pytest.mark.parametrize("group_size", [0, -128, 96, 1.5, True])
def test_group_size_must_be_a_positive_power_of_two(group_size):
    with pytest.raises(fptq.ConfigError, match="group_size"):
        fptq.WeightConfig(group_size=group_size)


@pytest.mark.parametrize(("v0", "v1"), [(150.0, 15.0), (15.0, 15.0), (-1.0, 5.0)])
def test_thresholds_must_be_ordered(v0, v1):
    with pytest.raises(fptq.ConfigError, match="v0"):
        fptq.ActivationConfig(static_threshold=v0, dynamic_threshold=v1)


def test_policy_must_be_the_enum():
    with pytest.raises(fptq.ConfigError, match="fptq, all_static"):
        fptq.ActivationConfig(policy="fptq")  # type: ignore[arg-type]


def test_patterns_must_be_a_tuple_of_strings():
    with pytest.raises(fptq.ConfigError, match="ignore"):
        fptq.CompileConfig(ignore="lm_head")  # type: ignore[arg-type]


def test_activation_spec_requires_a_scale_exactly_when_static():
    with pytest.raises(fptq.ConfigError):
        ActivationSpec(ActivationClass.STATIC)
    with pytest.raises(fptq.ConfigError):
        ActivationSpec(ActivationClass.DYNAMIC, scale=0.1)


def test_lae_group_needs_fold_and_scale():
    with pytest.raises(fptq.ConfigError, match="fold target"):
        ActivationGroup("x", ("a",), 20.0, ActivationSpec(ActivationClass.LAE_STATIC, scale=0.1), "r")


def test_plan_rejects_other_versions_and_malformed_data():
    plan = QuantPlan("fptq", 15.0, 150.0, layers=(), groups=())
    data = plan.to_dict()
    assert QuantPlan.from_dict(json.loads(json.dumps(data))) == plan
    with pytest.raises(fptq.ConfigError, match="version"):
        QuantPlan.from_dict({**data, "format_version": 99})
    with pytest.raises(fptq.ConfigError, match="malformed"):
        QuantPlan.from_dict({k: v for k, v in data.items() if k != "groups"})


def test_config_round_trips_through_plain_data_with_the_weight_and_cache_options():
    from fptq_compile.config import config_from_dict, config_to_dict

    config = fptq.CompileConfig(
        weights=fptq.WeightConfig(
            rounding=fptq.WeightRounding.NEAREST,
            gptq=fptq.GPTQConfig(damp=0.05, hessian_dtype=fptq.CalibrationDtype.FLOAT32),
        ),
        kv_cache_int8=True,
        calibration_dtype=fptq.CalibrationDtype.BFLOAT16,
    )
    data = json.loads(json.dumps(config_to_dict(config)))
    assert data["weights"]["rounding"] == "nearest" and data["kv_cache_int8"] is True
    assert data["calibration_dtype"] == "bfloat16" and data["weights"]["gptq"]["hessian_dtype"] == "float32"
    assert config_from_dict(data) == config
    with pytest.raises(fptq.ConfigError, match=r"calibration_dtype must be one of float32, bfloat16; got 'fp16'"):
        config_from_dict({"calibration_dtype": "fp16"})
    with pytest.raises(fptq.ConfigError, match=r"weights\.rounding must be one of gptq, nearest"):
        config_from_dict({"weights": {"rounding": "awq"}})
    with pytest.raises(fptq.ConfigError, match=r"weights.gptq.damp must be a number in \(0, 1\)"):
        fptq.GPTQConfig(damp=2.0)
