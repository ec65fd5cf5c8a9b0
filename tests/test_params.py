"""The params schema: defaults validate, errors name the key, overrides parse as YAML."""
import pytest

from tasks.params import Params, ParamsError, load_params, parse_override, REPO_ROOT


# params.yaml's run of the embedded dataset takes every pair of an image, in small shards; the
# schema's defaults suit an LVIS-size run (one pair an image, 256-image shards). Nothing else differs.
EMBEDDED_PROFILE = {("decompose", "pairs_per_image"): (1, 6), ("decompose", "shard_size"): (256, 64)}


def test_params_yaml_and_the_schema_hold_the_same_keys_and_defaults():
    """Old code: the schema said train.lr 1e-4, trainable reference, evaluate.steps 20 where params.yaml
    (what runs) said 1e-3, full, 2: two defaults for one key, drifted."""
    import yaml

    p = load_params(REPO_ROOT / "params.yaml")
    assert p.decompose.area_ratio == 0.02 and p.model.preset == "tiny"
    on_disk = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    schema = Params().model_dump(mode="json")
    # params.yaml lists every key of the schema (so `dvc params diff` shows every knob), and no other
    assert set(on_disk) == set(schema)
    for section, defaults in schema.items():
        assert set(on_disk[section]) == set(defaults), section
        differ = {k: (v, on_disk[section][k]) for k, v in defaults.items() if v != on_disk[section][k]}
        assert differ == {k: v for (s, k), v in EMBEDDED_PROFILE.items() if s == section}, section


def test_an_override_error_is_one_line_naming_the_key_and_the_set(tmp_path):
    """Old code: two lines that blamed params.yaml for a --set typo."""
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ParamsError) as e:
        load_params(None, ["train.steps=5", "train.lrr=0.1"])
    assert str(e.value) == "--set train.lrr=0.1: train.lrr: unknown key"
    with pytest.raises(ParamsError) as e:
        load_params(None, ["train.steps=0"])
    assert str(e.value).startswith("--set train.steps=0: train.steps: Input should be greater than or equal to 1")
    with pytest.raises(ParamsError) as e:  # the file's own error names the file, one line per error
        load_params(f, ["train.lr=0.5"])
    assert str(e.value) == f"{f}: train.stepz: unknown key"


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


def test_collage_residual_resolves_by_preset_and_needs_x0_prediction():
    assert load_params(None).model.residual()  # the tiny default
    assert not load_params(None, ["model.latent=kl"]).model.residual()
    assert not load_params(None, ["model.preset=sd21"]).model.residual()
    with pytest.raises(ParamsError, match="prediction_type 'v_prediction'.*collage_residual"):
        load_params(None, ["train.prediction_type=v_prediction"])
    assert load_params(None, ["train.prediction_type=v_prediction", "model.collage_residual=false"])
    with pytest.raises(ParamsError, match="collage_residual needs"):
        load_params(None, ["model.preset=sd21", "model.collage_residual=true"])
