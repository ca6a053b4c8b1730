"""Spec model and loader: shipped specs validate; every kind of user mistake gives a field-named SpecError."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipelines.spec import Spec, apply_override, dump_resolved, load_spec
from pipelines.stages import declared_names, load, stage_class
from sdk.errors import SpecError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "specs").glob("*.yaml"))
MINIMAL = "name: t\nsource: {paths: [stdlib]}\n"


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_three_specs_are_shipped():
    assert {p.name for p in SHIPPED} >= {"github_19b.yaml", "local_demo.yaml", "ci_small.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spec_validates_and_round_trips(path: Path):
    spec = load_spec(path)
    assert declared_names(spec)[0] == "curate"
    # The resolved dump is itself a valid spec that hashes the same: what ran can be rerun.
    again = Spec.model_validate(yaml.safe_load(dump_resolved(spec)))
    assert stage_class("generate").section_hash(again) == stage_class("generate").section_hash(spec)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_json_schema_validates_shipped_specs(path: Path):
    schema = Spec.model_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_json_schema_rejects_unknown_field():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "x", "sorce": {}}, Spec.model_json_schema())


def test_paper_spec_carries_the_method_settings():
    spec = load_spec(REPO / "specs" / "github_19b.yaml")
    assert spec.executor.kind == "slurm"
    assert spec.source.kind == "huggingface"
    assert "6.7b" in spec.generate.strong.model.name and "1.3b" in spec.generate.weak.model.name
    assert "1.3b" in spec.describe.model.name and spec.describe.sampling.temperature == 0.7
    assert spec.pretrain.model.startswith("Qwen/Qwen2")
    assert (spec.pretrain.schedule, spec.pretrain.zero_stage, spec.pretrain.learning_rate) == ("wsd", 2, 1e-6)
    assert (spec.pretrain.rm_coef, spec.pretrain.lm_coef, spec.finetune.lm_coef) == (1.0, 1.0, 0.0)


def test_demo_weak_model_is_a_pruned_sibling_of_the_strong():
    spec = load_spec(REPO / "specs" / "local_demo.yaml")
    strong, weak = spec.generate.strong.model, spec.generate.weak.model
    assert strong.name == weak.name == "smollm2-135m-instruct"
    assert strong.prune is None and weak.prune is not None


def test_relative_paths_resolve_against_the_spec_file(tmp_path: Path):
    (tmp_path / "code").mkdir()
    (tmp_path / "model").mkdir()
    spec = load_spec(
        write(tmp_path, "name: t\nsource: {paths: [code, stdlib]}\npretrain: {model: model, data: p.jsonl}\n")
    )
    assert spec.source.paths == [str(tmp_path / "code"), "stdlib"]
    assert spec.pretrain.model == str(tmp_path / "model")  # an existing dir is a local model
    assert spec.pretrain.data == str(tmp_path / "p.jsonl")


def test_hub_ids_and_registry_names_are_not_treated_as_paths(tmp_path: Path):
    spec = load_spec(write(tmp_path, "name: t\npretrain: {model: Qwen/Qwen2-7B, data: x.jsonl}\n"))
    assert spec.pretrain.model == "Qwen/Qwen2-7B"


def test_env_expansion_with_default_and_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CODE_DIR", "/data/code")
    monkeypatch.delenv("UNSET_DIR", raising=False)
    spec = load_spec(write(tmp_path, "name: t\nsource: {paths: ['${CODE_DIR}', '${UNSET_DIR:-/fallback}']}\n"))
    assert spec.source.paths == ["/data/code", "/fallback"]
    with pytest.raises(SpecError, match=r"source\.paths\[0\]: environment variable UNSET_DIR is not set"):
        load_spec(write(tmp_path, "name: t\nsource: {paths: ['${UNSET_DIR}']}\n"))


def test_set_overrides_apply_before_validation(tmp_path: Path):
    path = write(tmp_path, MINIMAL)
    spec = load_spec(path, ["source.limit=5", "executor.tasks=4", "source.paths.0=/x", "filters.size.enabled=false"])
    assert (spec.source.limit, spec.executor.tasks, spec.source.paths, spec.filters.size.enabled) == (
        5,
        4,
        ["/x"],
        False,
    )
    created = load_spec(path, ["dedup.minhash.buckets=20"])  # creates nested sections on the way
    assert created.dedup.minhash.buckets == 20


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("novalue", "expected dotted.key=value"),
        ("=3", "expected dotted.key=value"),
        ("a..b=1", "empty component"),
        ("name.x=1", "name is a value, not a section"),
        ("source.paths.7=/x", "list index out of range"),
        ("source.limit=[unclosed", "not valid YAML"),
    ],
)
def test_bad_set_is_a_clear_error(tmp_path: Path, override: str, message: str):
    with pytest.raises(SpecError, match=message):
        load_spec(write(tmp_path, MINIMAL), [override])


# Each malformed case: (spec text, expected fragment naming the field or the problem).
BOMB = "name: t\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)
)  # 24 lines that expand to 10^9 strings

MALFORMED = {
    "task_count_typo": (
        "name: t\nexecutor: {kind: local, tasks: 100000000000000000000}\n",
        "executor.tasks: must be <= 100000",
    ),
    "reply_length_typo": (
        "name: t\ndescribe: {model: {name: m}, sampling: {max_new_tokens: 1000000000}}\n",
        "describe.sampling.max_new_tokens: must be <= 1048576",
    ),
    "alias_bomb": (BOMB, "the spec expands to more than 100,000 values (YAML aliases"),
    "unknown_top_key": ("name: t\nsorce: {paths: [stdlib]}\n", "sorce: unknown field"),
    "unknown_nested_key": (
        "name: t\ngenerate:\n  strong: {model: {name: a}}\n  weak: {model: {name: b}, samplng: {}}\n",
        "generate.weak.samplng: unknown field (did you mean `sampling`?)",
    ),
    "wrong_type": (
        "name: t\nsource: {paths: [stdlib], limit: lots}\n",
        "source.limit: Input should be a valid integer",
    ),
    "negative_size": ("name: t\nfilters: {size: {max_bytes: -5}}\n", "filters.size.max_bytes: must be > 0"),
    "negative_temperature": (
        "name: t\ngenerate:\n  strong: {model: {name: a}, sampling: {temperature: -1}}\n  weak: {model: {name: b}}\n",
        "generate.strong.sampling.temperature: must be >= 0",
    ),
    "bad_enum": ("name: t\nexecutor: {kind: kubernetes}\n", "executor: Input tag 'kubernetes'"),
    "bad_precision_enum": (
        "name: t\npretrain: {model: m, data: d, precision: fp8}\n",
        "pretrain.precision: Input should be",
    ),
    "empty_file": ("", "spec is empty"),
    "yaml_syntax": ("name: t\nsource: {paths: [stdlib\n", "invalid YAML"),
    "top_level_list": ("- name: t\n", "must be a mapping of sections"),
    "missing_required": ("source: {paths: [stdlib]}\n", "name: required field is missing"),
    "strong_equals_weak": (
        "name: t\ngenerate:\n  strong: {model: {name: m}}\n  weak: {model: {name: m}}\n",
        "strong and weak are the same model",
    ),
    "executor_field_of_other_kind": (
        "name: t\nexecutor: {kind: local, partition: gpu}\n",
        "executor.partition: unknown field",
    ),
    "workers_over_tasks": ("name: t\nexecutor: {tasks: 2, workers: 8}\n", "workers (8) must be <= tasks (2)"),
    "minhash_signature_too_big": (
        "name: t\ndedup: {minhash: {buckets: 100, hashes_per_bucket: 100}}\n",
        "dedup.minhash: buckets x hashes_per_bucket = 10000",
    ),
    "describe_context_overflow": (
        "name: t\nsource: {paths: [stdlib]}\ndescribe:\n  model: {name: m, max_model_len: 1024}\n"
        "  max_input_tokens: 1000\n  sampling: {max_new_tokens: 100}\n",
        "exceed model.max_model_len (1024)",
    ),
    "stage_without_input": ("name: t\npretrain: {model: m}\n", "pretrain reads WORKDIR/pairs"),
    "evaluate_without_model": ("name: t\nevaluate: {heldout: h.parquet}\n", "evaluate scores the trained model"),
    "template_placeholder": (
        "name: t\nsource: {paths: [stdlib]}\ndescribe: {model: {name: m}, template: 'Explain {snippet}'}\n",
        "unknown placeholder(s) ['snippet']",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_spec_names_the_problem(tmp_path: Path, case: str):
    text, fragment = MALFORMED[case]
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load(path)  # as the CLI loads a spec: the schema, then every stage's inputs
    message = str(info.value)
    assert fragment in message
    assert str(path) in message  # errors name the spec file
    assert "Traceback" not in message and "\n" not in message


def test_python_object_tag_is_refused_and_never_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError, match=r"\(line 1\): YAML tag not allowed"):
        load_spec(path)
    assert not marker.exists()


def test_missing_and_directory_spec_paths(tmp_path: Path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "absent.yaml")
    with pytest.raises(SpecError, match="not a file"):
        load_spec(tmp_path)


def test_section_hash_changes_only_with_the_stage_sections():
    spec = load_spec(REPO / "specs" / "ci_small.yaml")
    other = load_spec(REPO / "specs" / "ci_small.yaml", ["generate.strong.sampling.temperature=0.2"])
    assert stage_class("generate").section_hash(spec) != stage_class("generate").section_hash(other)
    assert stage_class("describe").section_hash(spec) == stage_class("describe").section_hash(other)
    curate_changed = load_spec(REPO / "specs" / "ci_small.yaml", ["filters.max_line.max_chars=500"])
    assert stage_class("curate").section_hash(curate_changed) != stage_class("curate").section_hash(spec)


def test_apply_override_parses_values_as_yaml():
    data: dict = {"name": "t"}
    apply_override(data, "pairs.balance.language_quotas={python: 0.5}")
    apply_override(data, "pairs.balance.length_bias_target=null")
    assert data["pairs"]["balance"] == {"language_quotas": {"python": 0.5}, "length_bias_target": None}
    assert json.dumps(data)  # plain data, no YAML objects


def test_an_alias_bomb_is_refused_fast_and_small(tmp_path: Path):
    import time
    import tracemalloc

    path = write(tmp_path, BOMB)
    tracemalloc.start()
    start = time.monotonic()
    with pytest.raises(SpecError, match="YAML aliases"):
        load_spec(path)
    elapsed = time.monotonic() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 2 and peak < 20 * 2**20, (elapsed, peak)
