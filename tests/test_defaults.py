"""One default per setting: the library's config dataclasses own it, and the deployment's parameters
(``clara_flows.params``), the profiles (``clara_flows.profiles``), the ``clara`` command's options (``clara.cli`` and
``flows/cli.py``) and the registered model's fallbacks (``flows/models.py``) say the same.

Every such default is listed below beside the library value it stands for (``SOURCES``); a default that is the
pipeline's or the command's alone is listed as such, and the few that differ on purpose are pinned with their reason.
A parameter or option added without an entry here fails ``test_every_default_is_accounted_for``.

Pure Python: nothing is trained or loaded; function defaults are read from the source (``ast``), not imported.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- where values live

@lru_cache(maxsize=None)
def _library() -> dict[str, Any]:
    """The config objects a value is read from, by the name the tables use."""
    from clara.config import E2EConfig, ModelConfig, SCPConfig
    from clara.data.synthesis import SynthesisConfig
    from clara.eval.gate import GateRule
    from clara.eval.run import EvalConfig

    return {"ModelConfig": ModelConfig(), "SCPConfig[scp]": SCPConfig.for_stage("scp"),
            "SCPConfig[instruct]": SCPConfig.for_stage("instruct"), "E2EConfig": E2EConfig(),
            "EvalConfig": EvalConfig(), "SynthesisConfig": SynthesisConfig(), "GateRule": GateRule()}


def _signature_default(spec: str) -> Any:
    """``clara/serving.py:Answerer.__init__(k)``: that parameter's default, read from the source."""
    path, _, rest = spec.partition(":")
    qualname, _, param = rest.rstrip(")").partition("(")
    scope: Any = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    for name in qualname.split("."):
        scope = next(n for n in scope.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
    args = scope.args
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    return next(ast.literal_eval(d) for a, d in pairs if a.arg == param)


@lru_cache(maxsize=None)
def _cli_defaults() -> dict[str, Any]:
    """``"<command path> --<param>"`` -> default of every option of the ``clara`` command that has one."""
    import typer

    from clara_flows.cli import build_app

    out = {}

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])
            return
        for p in cmd.params:
            if p.name != "help" and not p.required and p.default is not None and p.default != []:
                out[f"{' '.join(path)} --{p.name}"] = p.default

    walk(typer.main.get_command(build_app()), [])
    return out


def _flow_defaults() -> dict[str, Any]:
    """Every deployment parameter's default whose value is not ``None`` (``None``: not given, the profile or the
    library decides)."""
    from clara_flows.params import GROUPS

    return {name: f.default for cls in GROUPS.values() for name, f in cls.model_fields.items()
            if f.default is not None}


def _fallbacks() -> dict[str, Any]:
    """``flows/models.py``: the ``cfg.get(key, default)`` fallbacks of the QA model's ``load_context``."""
    tree = ast.parse((ROOT / "flows" / "models.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ClaraQAModel")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "load_context")
    return {c.args[0].value: ast.literal_eval(c.args[1]) for c in ast.walk(fn)
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "get"
            and isinstance(c.func.value, ast.Name) and c.func.value.id == "cfg" and len(c.args) == 2}


def value_of(spec: str) -> Any:
    """A library value: ``SCPConfig[instruct].train.optim.lr`` (a config object's attribute path, objects from
    ``_library``) or ``path.py:Func(param)`` (a function parameter's default)."""
    if ".py:" in spec:
        return _signature_default(spec)
    head, *attrs = spec.split(".")
    obj = _library()[head]
    for a in attrs:
        obj = getattr(obj, a)
    return obj


def same(a: Any, b: Any) -> bool:
    """Equal, with 2 equal to 2.0 (not to True), and a comma-separated option string equal to the tuple it is
    split into."""
    if isinstance(a, (tuple, list)) and isinstance(b, str):
        a, b = b, a
    if isinstance(a, str) and isinstance(b, (tuple, list)):
        return [x for x in a.split(",") if x] == list(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------------------------------------- tables

# deployment parameter (flows/params.py) -> the library value it must equal
FLOW = {
    "preset": "ModelConfig.base",
    "compression_rate": "ModelConfig.compression_rate",
    "memory_readout": "ModelConfig.memory_readout",
    "scp_lr": "SCPConfig[scp].train.optim.lr",
    "instruct_lr": "SCPConfig[instruct].train.optim.lr",
    "instruct_freeze_compressor": "SCPConfig[instruct].freeze_compressor",
    "instruct_compressor_lr_scale": "SCPConfig[instruct].compressor_lr_scale",
    "e2e_lr": "E2EConfig.train.optim.lr",
    "top_k": "E2EConfig.top_k",
    "n_candidates": "E2EConfig.n_candidates",
    "retrieval_mode": "EvalConfig.mode",
    "retrieval_fuse": "EvalConfig.fuse",
    "retrieval_rerank": "EvalConfig.rerank",
    "gate_margin": "GateRule.margin",
    "gate_max_latency_regression": "GateRule.max_latency_regression",
}
# the pipeline's own settings (no library counterpart), and where the `clara` command has the same one
FLOW_ONLY = {
    "corpus": None, "shards": None, "train_processes": None, "dask_workers": None, "experiment": None,
    "refresh_cache": None,
    "teacher": "synthesize --teacher", "dvc_push": "data snapshot --push", "model_name": "models --name",
    "gate_metric": "models --metric",
}
# different on purpose: parameter -> (its value, the library value it differs from, why)
FLOW_DIFFERS = {
    "baselines": ("bm25", "EvalConfig.baselines", "the gate needs one raw-text reference; each baseline is another "
                                                  "generation pass over the evaluation questions"),
}

# profile key (flows/profiles.py) -> the library value every profile must give it
PROFILE = {"scp_target_dropout": "SCPConfig[scp].target_dropout"}
PROFILE_BUDGETS = {"init_from", "max_docs", "scp_steps", "scp_batch_size", "instruct_steps", "instruct_batch_size",
                   "e2e_steps", "e2e_batch_size", "eval_questions"}  # sizes of a run: no library default to equal

# `clara` option ("<command path> --<param>") -> the library value its default must equal
CLI = {
    "synthesize --api_key_env": "clara/data/teachers.py:build_teacher(api_key_env)",
    "synthesize --concurrency": "clara/data/teachers.py:build_teacher(concurrency)",
    "synthesize --timeout": "clara/data/teachers.py:build_teacher(timeout)",
    "synthesize --device": "clara/data/teachers.py:build_teacher(device)",
    "synthesize --on_error": "clara/data/corpus.py:ingest_corpus(on_error)",
    "synthesize --preset": "ModelConfig.base",
    "synthesize --coverage_rounds": "SynthesisConfig.coverage_rounds",
    "synthesize --min_coverage": "SynthesisConfig.min_coverage",
    "synthesize --dev_fraction": "SynthesisConfig.dev_fraction",
    "synthesize --batch_docs": "SynthesisConfig.batch_docs",
    "synthesize --seed": "SynthesisConfig.seed",
    "evaluate --k": "EvalConfig.k",
    "evaluate --max_new_tokens": "EvalConfig.max_new_tokens",
    "evaluate --baselines": "EvalConfig.baselines",
    "evaluate --mode": "EvalConfig.mode",
    "evaluate --fuse": "EvalConfig.fuse",
    "evaluate --rerank": "EvalConfig.rerank",
    "evaluate --settings": "EvalConfig.settings",
    "evaluate --merge": "EvalConfig.merge",
    "evaluate --seed": "clara/eval/datasets.py:subsample(seed)",
    "evaluate --resume": "clara/eval/run.py:evaluate(resume)",
    "compress --batch_size": "clara/store/loading.py:index_corpus(batch_size)",
    "train scp --preset": "ModelConfig.base",
    "train scp --resume": "clara/training/scp.py:train_scp(resume)",
    "train instruct --resume": "clara/training/scp.py:train_scp(resume)",
    "train e2e --resume": "clara/training/e2e.py:train_e2e(resume)",
    "model paraphrase --max_new_tokens": "clara/model/clara_model.py:ClaraModel.paraphrase(max_new_tokens)",
    "data ingest --on_error": "clara/data/corpus.py:ingest_corpus(on_error)",
    "data ingest --preset": "ModelConfig.base",
    "data mix --kinds": "clara/stages.py:training_mixes(kinds)",
    "data mix --k": "clara/stages.py:training_mixes(k)",
    "data mix --seed": "clara/stages.py:training_mixes(seed)",
    "data mix --reconstruction_share": "clara/stages.py:training_mixes(reconstruction_share)",
    "data snapshot --target": "clara/data/versioning.py:snapshot(target)",
    "data snapshot --push": "clara/data/versioning.py:snapshot(push)",
    "data snapshot --commit": "clara/data/versioning.py:snapshot(git_commit)",
    "data version --target": "clara/data/versioning.py:data_version(target)",
}
# the command's own choices: how it runs, not what it computes
CLI_ONLY = {"evaluate --use_store", "compress --dense", "promote --name", "rollback --name", "models --name",
            "models --metric", "ask --model", "ask --as_json", "data snapshot --repo", "data version --repo",
            "synthesize --teacher"}

# flows/models.py fallback (for versions registered without the key) -> the library value it must equal
FALLBACK = {
    "k": "clara/serving.py:Answerer.__init__(k)",
    "max_new_tokens": "clara/serving.py:Answerer.__init__(max_new_tokens)",
    "max_batch": "clara/serving.py:Batcher.__init__(max_batch)",
    "merge": "clara/serving.py:Answerer.load(merge)",
}
FALLBACK_DIFFERS = {  # key -> (fallback, why)
    "mode": ("clara", "versions registered before the first-stage modes searched with CLaRa alone"),
    "fuse": (0.0, "the same versions: the query reasoner's order alone"),
    "rerank": ("always", "versions registered before the re-rank became conditional always re-ranked"),
}

# the serving path's own defaults (clara.serving.Answerer) -> the evaluation's
LIBRARY = {
    "clara/serving.py:Answerer.__init__(k)": "EvalConfig.k",
    "clara/serving.py:Answerer.__init__(mode)": "EvalConfig.mode",
    "clara/serving.py:Answerer.__init__(fuse)": "EvalConfig.fuse",
    "clara/serving.py:Answerer.__init__(rerank)": "EvalConfig.rerank",
    "clara/serving.py:Answerer.__init__(max_new_tokens)": "EvalConfig.max_new_tokens",
    "E2EConfig.top_k": "EvalConfig.k",
}


# -------------------------------------------------------------------------------------------------- tests

def mismatches(table: dict[str, str], actual: dict[str, Any]) -> list[str]:
    return [f"{name} = {actual[name]!r}, but {spec} = {value_of(spec)!r}" for name, spec in table.items()
            if not same(actual[name], value_of(spec))]


def test_flow_parameters_equal_the_library_defaults():
    assert not mismatches(FLOW, _flow_defaults())


def test_flow_parameters_the_command_also_has_agree_with_it():
    flow, cli = _flow_defaults(), _cli_defaults()
    bad = [f"{name} = {flow[name]!r}, `clara {opt}` = {cli[opt]!r}" for name, opt in FLOW_ONLY.items()
           if opt is not None and not same(flow[name], cli[opt])]
    assert not bad


def test_deliberate_differences_are_still_what_they_say():
    flow = _flow_defaults()
    for name, (value, spec, why) in FLOW_DIFFERS.items():
        assert same(flow[name], value), f"{name} is now {flow[name]!r}: update FLOW_DIFFERS (or move it to FLOW)"
        assert not same(value, value_of(spec)), f"{name} now equals {spec}: move it to FLOW"
    fallbacks = _fallbacks()
    for key, (value, why) in FALLBACK_DIFFERS.items():
        assert same(fallbacks[key], value), f"flows/models.py's {key} fallback is now {fallbacks[key]!r}"


def test_profiles_equal_the_library_defaults():
    from clara_flows.profiles import PROFILES

    bad = [f"profile {p}: {k} = {values[k]!r}, but {spec} = {value_of(spec)!r}"
           for p, values in PROFILES.items() for k, spec in PROFILE.items() if not same(values[k], value_of(spec))]
    assert not bad


def test_command_options_equal_the_library_defaults():
    assert not mismatches(CLI, _cli_defaults())


def test_registered_model_fallbacks_equal_the_library_defaults():
    assert not mismatches(FALLBACK, _fallbacks())


def test_serving_defaults_equal_the_evaluation_defaults():
    bad = [f"{a} = {value_of(a)!r}, but {b} = {value_of(b)!r}" for a, b in LIBRARY.items()
           if not same(value_of(a), value_of(b))]
    assert not bad


def test_every_default_is_accounted_for():
    """A new parameter, profile key, option or fallback needs an entry above: mapped, its own, or differing
    with a reason."""
    from clara_flows.params import GROUPS
    from clara_flows.profiles import PROFILES

    fields = {n for cls in GROUPS.values() for n in cls.model_fields}
    assert set(_flow_defaults()) == set(FLOW) | set(FLOW_ONLY) | set(FLOW_DIFFERS)
    assert not set(FLOW) & set(FLOW_ONLY) and not set(FLOW) & set(FLOW_DIFFERS)
    for name, values in PROFILES.items():
        assert set(values) == set(PROFILE) | PROFILE_BUDGETS, name
        assert set(values) <= fields, name  # a profile sets deployment parameters, nothing else
    assert set(_cli_defaults()) == set(CLI) | CLI_ONLY
    assert set(_fallbacks()) == set(FALLBACK) | set(FALLBACK_DIFFERS)


def test_stage_two_defaults_reach_the_instruct_command_and_its_config_file_wins():
    from clara.config import SCPConfig

    inst = SCPConfig.for_stage("instruct")
    scp = SCPConfig.for_stage("scp")
    assert inst.train.optim.lr != scp.train.optim.lr and inst.freeze_compressor and not scp.freeze_compressor
    assert scp == SCPConfig()  # stage 1's defaults are the class's own
    given = SCPConfig.for_stage("instruct", {"freeze_compressor": False, "train": {"batch_size": 2}})
    assert not given.freeze_compressor and given.train.batch_size == 2
    assert given.train.optim.lr == inst.train.optim.lr  # a partial train table keeps the stage's lr
    with pytest.raises(ValueError, match="stage"):
        SCPConfig.for_stage("e2e")


def test_the_check_sees_a_disagreement():
    top_k = value_of("E2EConfig.top_k")
    assert mismatches({"x": "E2EConfig.top_k"}, {"x": top_k + 1}) == [f"x = {top_k + 1}, but E2EConfig.top_k = {top_k}"]
    assert not mismatches({"x": "EvalConfig.baselines"}, {"x": "bm25,minilm"})
    assert mismatches({"x": "EvalConfig.baselines"}, {"x": "bm25"})
    assert not same(1, True) and same(2, 2.0) and not same("5", 5) and not same(False, 0)
