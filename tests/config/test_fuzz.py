"""Generated bad configs and command lines (hypothesis): each is refused with exit status 2 and one line, no
traceback, before any work starts. benchmarks/faults.py runs the same property on 1,000 examples."""

import dataclasses
import os
import tempfile
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openvision_max.config import cli_config
from openvision_max.config.schema import Config

from conftest import CONFIGS

FIELDS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config) if f.name != "derived"}
NUMBERS = sorted(k for k, t in FIELDS.items() if t in (int, float))
BOOLS = sorted(k for k, t in FIELDS.items() if t is bool)
CHOICES = sorted(k for k, t in FIELDS.items() if typing.get_origin(t) is typing.Literal)
TOWER_INTS = ["width", "depth", "mlp_dim", "num_heads"]
STRINGS = sorted(k for k, t in FIELDS.items() if t is str)  # a value that is not YAML is taken as the string
# Values each of these keys must refuse (a count, a size or a period below its least meaningful value).
OUT_OF_RANGE = {
    "steps": [0, -1], "global_batch_size": [0, -8, 7], "log_period": [0, -1], "checkpoint_period": [0, -5],
    "max_checkpoints_to_keep": [0, -1], "image_size": [0, -32, 33], "patch_size": [0, -8], "embed_dim": [0, -1],
    "vocab_size": [0, -1], "warmup_steps": [-1], "gradient_accumulation_steps": [0, -2, 3],
    "max_nonfinite_steps": [0, -1], "base_lr": [-0.001], "weight_decay": [-0.1], "adam_b1": [-0.1, 1.0, 1.5],
    "adam_b2": [1.5, -0.2], "adam_eps": [-1e-8], "grad_clip_norm": [-1.0], "eval_period": [-1],
    "eval_batch_size": [0, -4], "grain_worker_count": [-1], "grain_read_threads": [-1],
    "grain_worker_buffer_size": [0], "grain_prefetch_buffer_size": [0], "flash_block_q": [0, -128],
    "jax_distributed_initialization_timeout": [0, -5], "compile_topology_num_slices": [0, -1],
    "contrastive_weight": [-1.0], "caption_weight": [-1.0],
}
BROKEN_YAML = ["[1, 2", "{a: ", "a: b: c", "[", "}", "'unclosed", "- - -\n  x: [", "{a: 1, a: 2"]

def assign(pair):
    return [f"{pair[0]}={pair[1]}"]


unknown_key = st.from_regex(r"[a-z][a-z_]{2,14}", fullmatch=True).filter(lambda k: k not in FIELDS)
bad_lines = st.one_of(
    unknown_key.map(lambda k: [f"{k}=1"]),
    st.tuples(st.sampled_from(["vision", "text", "decoder"]), unknown_key).map(lambda t: [f"{t[0]}.{t[1]}=4"]),
    st.tuples(st.sampled_from(NUMBERS), st.sampled_from(["abc", "[1, 2]", "{a: 1}", "true", "''", "1e"]))
    .map(assign),
    st.tuples(st.sampled_from(BOOLS), st.sampled_from(["maybe", "2", "[true]", "{}"])).map(assign),
    st.tuples(st.sampled_from(CHOICES), st.sampled_from(["bogus", "1", "[flash]", "FLOAT32"]))
    .map(assign),
    st.sampled_from([(k, v) for k in sorted(OUT_OF_RANGE) for v in OUT_OF_RANGE[k]]).map(assign),
    st.tuples(st.sampled_from(["vision", "text", "decoder"]), st.sampled_from(TOWER_INTS), st.sampled_from([0, -2]))
    .map(lambda t: [f"{t[0]}.{t[1]}={t[2]}"]),
    # Wrong nesting: a tower as a scalar, a scalar as a mapping, a key below a scalar.
    st.sampled_from([["vision=3"], ["text=[1]"], ["steps.x=1"], ["vision.width.x=2"], ["seed={a: 1}"],
                     ["stages=5"], ["evals={name: x}"], ["train_data=3"], ["logical_axis_rules=7"]]),
    # Meshes the 8 devices cannot make.
    st.tuples(st.sampled_from(["ici_data_parallelism", "ici_fsdp_parallelism", "ici_tensor_parallelism"]),
              st.sampled_from([3, 5, 6, 7, 16, 0, -2])).map(lambda t: [f"{t[0]}={t[1]}", "ici_fsdp_parallelism=1"
                                                                     if t[0] != "ici_fsdp_parallelism" else "seed=0"]),
    st.sampled_from([["ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=4"],
                     ["ici_data_parallelism=-1", "ici_fsdp_parallelism=-1"], ["dcn_data_parallelism=2"]]),
    # Stage lists: unknown stage, bad entries.
    st.sampled_from([["stage=nonexistent"], ["stages=[{name: a, steps: -1}]"], ["stages=[{steps: 10}]"],
                     ["stages=[{name: a, steps: 10, bogus_key: 1}]"], ["stages=[{name: a, steps: 10}, {name: a, "
                                                                        "steps: 10}]"], ["stages=[3]"],
                     ["stages=[{name: a, steps: 10, image_size: 33}]"]]),
    # Malformed YAML values and command-line shapes.
    st.tuples(st.sampled_from(sorted(set(FIELDS) - set(STRINGS))), st.sampled_from(BROKEN_YAML)).map(assign),
    st.sampled_from([["steps"], ["=3"], ["steps==3"], [" =x"], ["steps=1", "steps"]]),
)


def refused(argv, capsys):
    """(exit status, stderr) of train.py's config step on `argv`."""
    with pytest.raises(SystemExit) as e:
        cli_config(argv, "train.py")
    return e.value.code, capsys.readouterr().err


# benchmarks/faults.py sets OPENVISION_FUZZ_EXAMPLES (1,000); make test runs 200, 170 + 30.
EXAMPLES = int(os.environ.get("OPENVISION_FUZZ_EXAMPLES", "200"))


@settings(max_examples=EXAMPLES * 17 // 20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=bad_lines)
def test_a_bad_command_line_is_one_line_and_exit_2(lines, capsys):
    code, err = refused([str(CONFIGS / "demo.yml"), *lines], capsys)
    assert code == 2 and "Traceback" not in err, (lines, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("train.py: config error: "), (lines, err)


@settings(max_examples=EXAMPLES - EXAMPLES * 17 // 20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.sampled_from(BROKEN_YAML), st.sampled_from(["steps: [", "vision: 3", "42", "- a\n- b",
                                                                     "bogus_key: 1", "steps: -3", "\t steps: 1"])))
def test_a_bad_config_file_is_one_line_and_exit_2(text, capsys):
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        f.write(text)
    try:
        code, err = refused([f.name], capsys)
    finally:
        os.unlink(f.name)
    assert code == 2 and "Traceback" not in err, (text, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("train.py: config error: "), (text, err)
