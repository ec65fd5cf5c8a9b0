"""The params schema: defaults validate, errors name the key, overrides parse as YAML."""
import pytest

from tasks.params import Params, ParamsError, load_params, parse_override, REPO_ROOT


def test_repository_params_yaml_validates_and_matches_schema_defaults():
    p = load_params(REPO_ROOT / "params.yaml")
    assert p.decompose.area_ratio == 0.02
    assert p.model.preset == "tiny"
    # params.yaml lists every key of the schema, so `dvc params diff` shows every knob.
    import yaml

    on_disk = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert set(on_disk) == set(Params.model_fields)
    for section, model in Params.model_fields.items():
        assert set(on_disk[section]) == set(model.annotation.model_fields), section


def test_unknown_key_is_rejected_with_its_dotted_name(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("decompose:\n  area_ratoi: 0.1\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    assert "decompose.area_ratoi: unknown key" in str(e.value)
    assert str(f) in str(e.value)


def test_bad_value_is_rejected_with_key_and_value(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("decompose:\n  pairing: nearest\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    assert "decompose.pairing" in str(e.value) and "nearest" in str(e.value)


def test_overrides_parse_as_yaml_and_win(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("decompose:\n  area_ratio: 0.1\n")
    p = load_params(f, ["decompose.area_ratio=0.05", "ray.address=auto", "decompose.patch_pad=[1.2, 1.3]"])
    assert p.decompose.area_ratio == 0.05
    assert p.ray.address == "auto"
    assert p.decompose.patch_pad == (1.2, 1.3)
    assert parse_override("train.steps=7") == (["train", "steps"], 7)


def test_override_errors():
    with pytest.raises(ParamsError, match="expected key=value"):
        load_params(None, ["decompose.area_ratio"])
    with pytest.raises(ParamsError, match="model.preset"):
        load_params(None, ["model.preset=sdxl"])
    with pytest.raises(ParamsError, match="max_objects"):
        load_params(None, ["make_sample.min_objects=4", "make_sample.max_objects=3"])


def test_malformed_yaml_names_the_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("decompose: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(f)
