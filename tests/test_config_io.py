"""The typed config loader: TOML -> nested dataclasses, overrides, strict errors, round trip."""

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from titans_scale.config import load_run_config
from titans_scale.config_io import (check_choices, config_from_dict, config_to_dict, dump_toml, load_config,
                                    save_config, sectioned)
from titans_scale.errors import ConfigError, TitansError


@dataclass
class Memory:
    depth: int = 2
    max_lr: float = 0.1
    chunk: int = 64


@dataclass
class Model:
    dim: int = 64
    variant: Literal["lmm", "mac", "mag", "mal"] = "mac"
    memory: Memory = field(default_factory=Memory)
    memory_layers: list[int] = field(default_factory=lambda: [0, 2])
    window: Optional[int] = None


@dataclass
class Train:
    lr: float = 3e-4
    steps: int = 100
    name: str = "run"
    bf16: bool = False
    tags: list[str] = field(default_factory=list)
    shape: tuple[int, ...] = (1, 1)
    note: Optional[str] = None


@dataclass
class Config:
    seed: int = 0
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)


@dataclass
class Required:
    path: str
    n: int = 1


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_without_file():
    assert load_config(Config) == Config()


def test_nested_sections_and_types(tmp_path):
    p = write(tmp_path, """
seed = 7
[model]
dim = 128
variant = "mag"
memory_layers = [1, 3, 5]
window = 256
[model.memory]
depth = 1
max_lr = 1          # an int is accepted for a float
[train]
tags = ["a", "b"]
bf16 = true
shape = [2, 3, 4]
""")
    cfg = load_config(Config, p)
    assert cfg.seed == 7
    assert cfg.model.dim == 128 and cfg.model.variant == "mag" and cfg.model.window == 256
    assert cfg.model.memory_layers == [1, 3, 5]
    assert cfg.model.memory.depth == 1
    assert cfg.model.memory.max_lr == 1.0 and isinstance(cfg.model.memory.max_lr, float)
    assert cfg.model.memory.chunk == 64  # untouched default
    assert cfg.train.tags == ["a", "b"] and cfg.train.bf16 is True and cfg.train.shape == (2, 3, 4)


def test_overrides_typed_by_field(tmp_path):
    p = write(tmp_path, "[model]\ndim = 32\n")
    cfg = load_config(Config, p, [
        "model.dim=48",                 # file value replaced
        "model.memory.max_lr=1e-2",
        "train.name=123",               # a str field keeps the text, not the int 123
        "train.bf16=true",
        "train.tags=x,y",               # list shorthand without brackets
        "model.memory_layers=[4, 5]",
        "model.window=none",            # Optional -> None
        "train.note=hello world",
        "model.variant=lmm",
        'train.lr=2',
    ])
    assert load_config(Config, None, ["train.lr=.5"]).train.lr == 0.5  # Python spelling, not TOML
    assert cfg.model.dim == 48
    assert cfg.model.memory.max_lr == 0.01
    assert cfg.train.name == "123"
    assert cfg.train.bf16 is True
    assert cfg.train.tags == ["x", "y"]
    assert cfg.model.memory_layers == [4, 5]
    assert cfg.model.window is None
    assert cfg.train.note == "hello world"
    assert cfg.model.variant == "lmm"
    assert cfg.train.lr == 2.0 and isinstance(cfg.train.lr, float)
    # overrides create sections the file does not have
    assert load_config(Config, None, ["train.steps=5"]).train.steps == 5


def test_unknown_key_names_dotted_key_and_close_match(tmp_path):
    p = write(tmp_path, "[model.memory]\ndepht = 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(Config, p)
    msg = str(e.value)
    assert "'model.memory.depht'" in msg and "'model.memory.depth'" in msg and "\n" not in msg

    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*'model'"):
        load_config(Config, None, ["modle.dim=3"])
    with pytest.raises(ConfigError, match=r"'train.stpes'.*did you mean 'train.steps'"):
        load_config(Config, None, ["train.stpes=3"])
    # a key under the wrong section points to the right one
    with pytest.raises(ConfigError, match=r"'train.dim'; did you mean 'model.dim'"):
        load_config(Config, None, ["train.dim=3"])
    # no close match: the valid keys of the section are listed instead
    with pytest.raises(ConfigError, match=r"'train.zzzzzz'; valid keys in \[train\]: lr, steps, name"):
        load_config(Config, None, ["train.zzzzzz=1"])


@pytest.mark.parametrize("text, key, expected, got", [
    ('[model]\ndim = "big"', "model.dim", "expected int", "'big' (str)"),
    ("[model]\ndim = 1.5", "model.dim", "expected int", "1.5 (float)"),
    ("[model]\ndim = true", "model.dim", "expected int", "True (bool)"),  # bool is not an int
    ("[train]\nlr = 'fast'", "train.lr", "expected float", "'fast' (str)"),
    ("[train]\nbf16 = 1", "train.bf16", "expected bool", "1 (int)"),
    ("[model]\nvariant = 'xl'", "model.variant", "expected one of 'lmm', 'mac', 'mag', 'mal'", "'xl'"),
    ("[model]\nmemory_layers = [1, 'a']", "model.memory_layers[1]", "expected int", "'a' (str)"),
    ("[model]\nmemory_layers = 3", "model.memory_layers", "expected list[int]", "3 (int)"),
    ("[model]\nwindow = 'w'", "model.window", "expected int or none", "'w' (str)"),
    ("model = 3", "model", "expected a table (Model)", "3 (int)"),
    ("[model]\nmemory = 2", "model.memory", "expected a table (Memory)", "2 (int)"),
])
def test_wrong_type_message(tmp_path, text, key, expected, got):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(Config, p)
    msg = str(e.value)
    assert f"config key '{key}'" in msg and expected in msg and got in msg, msg
    assert "\n" not in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, TitansError)


def test_wrong_type_in_override():
    with pytest.raises(ConfigError, match=r"'model.dim': expected int, got 'abc' \(str\)"):
        load_config(Config, None, ["model.dim=abc"])
    with pytest.raises(ConfigError, match=r"'train.steps': expected int, got 'none'"):
        load_config(Config, None, ["train.steps=none"])  # not Optional
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_config(Config, None, ["model.dim"])
    with pytest.raises(ConfigError, match="'model.dim' is a value, not a section"):
        load_config(Config, None, ["model.dim.x=1"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Config, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Config, write(tmp_path, "[model\ndim = 3"))
    with pytest.raises(ConfigError, match=r"'path' is required"):
        load_config(Required, write(tmp_path, "n = 2"))
    assert config_from_dict(Required, {"path": "x"}) == Required(path="x")


def test_post_init_errors_become_config_errors():
    @dataclass
    class Checked:
        heads: int = 4
        dim: int = 64

        def __post_init__(self):
            if self.dim % self.heads:
                raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")

    with pytest.raises(ConfigError, match="dim=65 must be divisible by heads=4"):
        config_from_dict(Checked, {"dim": 65})


def test_round_trip(tmp_path):
    cfg = Config(
        seed=-3,
        model=Model(dim=96, variant="mal", memory=Memory(depth=3, max_lr=1e-5, chunk=16),
                    memory_layers=[], window=4096),
        train=Train(lr=float("inf"), steps=2**40, name='we"ird \\ name\n\ttab é \x7f \x01 [x]',
                    bf16=True, tags=["a b", "", "c=d"], shape=(3,), note="n"),
    )
    text = dump_toml(cfg)
    assert tomllib.loads(text) == config_to_dict(cfg)
    path = save_config(cfg, tmp_path / "out" / "resolved.toml")
    back = load_config(Config, path)
    assert back == cfg
    # None with a None default is left out, and loads back as None
    assert "window" not in dump_toml(Config())
    assert load_config(Config, save_config(Config(), tmp_path / "d.toml")) == Config()
    # a float that happens to be whole stays a float
    c2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=2.0))
    assert load_config(Config, save_config(c2, tmp_path / "e.toml")).train.lr == 2.0


def test_none_without_none_default_is_refused():
    @dataclass
    class C:
        x: Optional[int] = 3

    with pytest.raises(ConfigError, match="'x': TOML has no null"):
        dump_toml(C(x=None))


def test_literal_error_names_the_values_to_use():
    with pytest.raises(ConfigError) as e:
        load_config(Config, None, ["model.variant=xl"])
    msg = str(e.value)
    assert "config key 'model.variant'" in msg and "model.variant=VALUE (VALUE: lmm, mac, mag or mal)" in msg


def test_override_names_the_bad_item_of_a_list():
    with pytest.raises(ConfigError) as e:
        load_config(Config, None, ['model.memory_layers=[1, "a"]'])
    msg = str(e.value)
    assert "config key 'model.memory_layers[1]': expected int, got 'a' (str)" in msg, msg
    assert "override model.memory_layers=[...]" in msg


@sectioned
class Sectioned:
    model: Model
    train: Train = field(default_factory=lambda: Train(steps=7))    # an explicit default is kept


def test_sectioned_fields_default_to_their_sections():
    assert Sectioned() == Sectioned(Model(), Train(steps=7))
    assert Sectioned().model is not Sectioned().model                 # a fresh section each time
    assert load_config(Sectioned, None, ["model.dim=8"]).model.dim == 8
    with pytest.raises(TypeError, match="only config dataclasses"):
        @sectioned
        class NotSections:
            n: int


def test_check_choices_for_configs_built_in_code():
    check_choices(Model(variant="mag"))
    with pytest.raises(ConfigError, match=r"^--variant: 'xl' is not known; use lmm, mac, mag or mal$"):
        check_choices(Model(variant="xl"), lambda f: f"--{f}")


def test_empty_or_sectionless_config_file_is_refused(tmp_path):
    """Issue 22: an empty file trained a default model with no word that every section was defaulted."""
    for text in ("", "\n# [model]\n# dim = 8\n"):
        with pytest.raises(ConfigError, match=r"config file '.*c\.toml' is empty \(no \[section\] in it\)"):
            load_config(Sectioned, write(tmp_path, text))
    assert load_config(Sectioned, write(tmp_path, "[model]\n")) == Sectioned()     # defaults on purpose
    assert load_config(Required, write(tmp_path, "path = 'x'\n")).path == "x"      # a flat config is not sectioned


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.as_posix().split("/configs/")[-1])
def test_every_shipped_config_loads_and_validates(path):
    load_run_config(str(path)).validate()
