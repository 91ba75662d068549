"""Lesson 07's claims: export -> check -> run for both models, any batch size, int8, .pt2, a Predictor that refuses bad input."""
import copy
import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from mvtk import export
from mvtk.errors import ExportError, InputShapeError, IntegrityError, InvalidArgumentError
from mvtk.models import MLP, SmallCNN
from mvtk.registry import Registry

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 16, 16)}


def make_model(name):
    torch.manual_seed(0)
    return (MLP() if name == "mlp" else SmallCNN()).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each course model exported once (export takes seconds): name -> (model, path)."""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, shape in SHAPES.items():
        model = make_model(name)
        out[name] = (model, export.export_onnx(model, torch.rand(2, *shape), folder / f"{name}.onnx"))
    return out


@pytest.mark.parametrize("name", SHAPES)
def test_exported_model_passes_the_onnx_checker_and_runs(exported, name):
    model, path = exported[name]
    export.check_onnx(path)
    logits = export.run_onnx(export.load_session(path), torch.rand(3, *SHAPES[name]))
    assert logits.shape == (3, 10) and logits.dtype == np.float32


@pytest.mark.parametrize("batch", [1, 7, 256])
@pytest.mark.parametrize("name", SHAPES)
def test_onnx_agrees_with_pytorch_at_any_batch_size(exported, name, batch):
    model, path = exported[name]
    parity = export.check_parity(model, export.load_session(path), torch.rand(batch, *SHAPES[name]))
    assert parity.samples == batch and parity.agreement == 1.0


@pytest.mark.parametrize("name", SHAPES)
def test_graph_has_a_named_dynamic_batch_dimension(exported, name):
    summary = export.describe_onnx(exported[name][1])
    assert summary.inputs == [("images", ("batch", *SHAPES[name]), "float32")]
    assert summary.outputs == [("logits", ("batch", 10), "float32")]


def test_summary_lists_opset_operators_and_weights(exported):
    summary = export.describe_onnx(exported["cnn"][1])
    assert summary.opset >= 18
    assert summary.operators["Conv"] == 2 and summary.operators["Gemm"] == 2
    weights = sum(p.numel() for p in exported["cnn"][0].parameters())
    assert 0 <= summary.parameters - weights <= 8  # plus a constant or two, such as Reshape's target shape


def test_single_file_layout_holds_the_weights_in_the_onnx_file(exported):
    summary = export.describe_onnx(exported["cnn"][1])
    assert list(summary.files) == ["cnn.onnx"] and summary.size_bytes > 4 * summary.parameters


def test_external_data_layout_writes_weights_beside_the_graph(tmp_path):
    model = make_model("cnn")
    path = export.export_onnx(model, torch.rand(2, *SHAPES["cnn"]), tmp_path / "cnn.onnx", external_data=True)
    files = export.describe_onnx(path).files
    assert list(files) == ["cnn.onnx", "cnn.onnx.data"] and files["cnn.onnx.data"] > 4 * 100_000
    export.check_parity(model, export.load_session(path), torch.rand(4, *SHAPES["cnn"]))


def test_export_is_byte_identical_wherever_it_runs_and_holds_no_source_paths(exported, tmp_path):
    again = export.export_onnx(make_model("mlp"), torch.rand(2, *SHAPES["mlp"]), tmp_path / "elsewhere" / "m.onnx")
    data = again.read_bytes()
    assert data == exported["mlp"][1].read_bytes()
    for source_dir in (Path(export.__file__).parent, Path(torch.__file__).parent):
        assert str(source_dir).encode() not in data
    assert export.SOURCE_TRACE_KEY.encode() not in data


def test_dropping_source_traces_reaches_functions_and_subgraphs():
    traced = onnx.helper.make_node("Relu", ["x"], ["y"])
    onnx.helper.set_metadata_props(traced, {export.SOURCE_TRACE_KEY: "/home/me/model.py", "namespace": "keep"})
    body = onnx.helper.make_graph([copy.deepcopy(traced)], "body", [], [])
    branch = onnx.helper.make_node("If", ["c"], ["z"], then_branch=body, else_branch=body)
    function = onnx.helper.make_function("local", "f", ["x"], ["y"], [copy.deepcopy(traced)], [])
    graph = onnx.helper.make_graph([copy.deepcopy(traced), branch], "main", [], [])
    proto = export.drop_source_traces(onnx.helper.make_model(graph, functions=[function]))
    nodes = [proto.graph.node[0], proto.functions[0].node[0],
             proto.graph.node[1].attribute[0].g.node[0], proto.graph.node[1].attribute[1].g.node[0]]
    assert all([(p.key, p.value) for p in node.metadata_props] == [("namespace", "keep")] for node in nodes)


def test_export_leaves_the_model_as_it_was(tmp_path):
    model = make_model("mlp").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export.export_onnx(model, torch.rand(1, *SHAPES["mlp"]), tmp_path / "mlp.onnx")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_rejects_an_example_that_is_not_a_tensor(tmp_path):
    with pytest.raises(InvalidArgumentError, match="example must be a torch.Tensor"):
        export.export_onnx(make_model("mlp"), np.zeros((2, 1, 8, 8), np.float32), tmp_path / "mlp.onnx")


def test_export_rejects_a_path_without_the_onnx_suffix(tmp_path):
    with pytest.raises(InvalidArgumentError, match="ending in .onnx"):
        export.export_onnx(make_model("mlp"), torch.rand(2, 1, 8, 8), tmp_path / "mlp.bin")


def test_export_failure_names_the_model(tmp_path):
    with pytest.raises(ExportError, match="could not export MLP"):
        export.export_onnx(make_model("mlp"), torch.rand(2, 1, 4, 4), tmp_path / "mlp.onnx")
    assert not (tmp_path / "mlp.onnx").exists()


def test_checker_rejects_a_corrupted_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(ExportError, match="broken.onnx"):
        export.check_onnx(path)


def test_parity_check_fails_for_other_weights(exported):
    _, path = exported["mlp"]
    torch.manual_seed(1)
    with pytest.raises(ExportError, match="disagree"):
        export.check_parity(MLP().eval(), export.load_session(path), torch.rand(8, *SHAPES["mlp"]))


def test_int8_copy_is_smaller_and_still_runs(exported, tmp_path):
    _, path = exported["cnn"]
    int8 = export.quantize_onnx(path, tmp_path / "cnn_int8.onnx")
    assert export.onnx_size(path) / export.onnx_size(int8) > 3.0
    assert "MatMulInteger" in export.describe_onnx(int8).operators
    assert export.run_onnx(export.load_session(int8), torch.rand(7, *SHAPES["cnn"])).shape == (7, 10)


def test_latency_rows_cover_each_batch_size(exported):
    model, path = exported["mlp"]
    rows = export.compare_latency(model, export.load_session(path), SHAPES["mlp"], (1, 4), budget_s=0.01)
    assert [r.batch for r in rows] == [1, 4] and all(r.eager_s > 0 and r.onnx_s > 0 for r in rows)


def test_torch_export_program_round_trips_through_a_pt2_file(tmp_path):
    model = make_model("cnn")
    path = export.save_exported(model, torch.rand(1, *SHAPES["cnn"]), tmp_path / "cnn.pt2")
    images = torch.rand(5, *SHAPES["cnn"])
    loaded = export.load_exported(path)
    torch.testing.assert_close(loaded(images), export.predict_logits(model, images))


# -- the Predictor ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry with one MLP at alias 'production' and a Predictor serving it."""
    root = tmp_path_factory.mktemp("served")
    registry = Registry(root / "registry")
    model = make_model("mlp")
    mv = registry.register("digits-mlp", model)
    registry.set_alias("digits-mlp", "production", mv.version)
    predictor = export.Predictor.from_registry(registry, "digits-mlp", alias="production",
                                               cache_dir=root / "onnx_cache")
    return registry, model, predictor, root / "onnx_cache"


def test_predictor_returns_labels_and_probabilities_for_a_batch(served):
    _, model, predictor, _ = served
    images = torch.rand(6, *SHAPES["mlp"])
    result = predictor.predict(images)
    assert result.labels.shape == (6,) and result.probabilities.shape == (6, 10)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (result.labels == export.predict_logits(model, images).argmax(dim=1).numpy()).all()


def test_predictor_exports_each_version_once_into_a_cache_named_by_its_sha256(served, monkeypatch):
    registry, _, predictor, cache = served
    sha = registry.get("digits-mlp", alias="production").sha256
    assert predictor.path == cache / f"digits-mlp-v1-{sha[:16]}.onnx"
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    again = export.Predictor.from_registry(registry, "digits-mlp", alias="production", cache_dir=cache)
    assert again.path == predictor.path


def test_predictor_rejects_the_wrong_shape(served):
    with pytest.raises(InputShapeError, match=r"expects a batch of shape \(N, 1, 8, 8\), got \(2, 1, 16, 16\)"):
        served[2].predict(torch.rand(2, 1, 16, 16))


def test_predictor_rejects_one_image_without_a_batch_dimension(served):
    with pytest.raises(InputShapeError, match=r"images\[None\]"):
        served[2].predict(torch.rand(1, 8, 8))


def test_predictor_rejects_the_wrong_dtype(served):
    with pytest.raises(InputShapeError, match="expects float32 images, got float64"):
        served[2].predict(np.random.rand(2, 1, 8, 8))


def test_predictor_rejects_nan_input(served):
    images = torch.rand(3, *SHAPES["mlp"])
    images[1, 0, 2, 2] = float("nan")
    with pytest.raises(InputShapeError, match="1 NaN/inf value.*first in image 1"):
        served[2].predict(images)


def test_predictor_rejects_values_outside_the_training_range(served):
    with pytest.raises(InputShapeError, match=r"pixel values in \[0, 1\]"):
        served[2].predict(torch.rand(2, *SHAPES["mlp"]) * 16)


def test_predictor_rejects_an_empty_batch(served):
    with pytest.raises(InputShapeError, match="empty batch"):
        served[2].predict(torch.rand(0, *SHAPES["mlp"]))


def test_predictor_rejects_a_list(served):
    with pytest.raises(InputShapeError, match="torch.Tensor or numpy array, got list"):
        served[2].predict([[0.0] * 64])


def test_predictor_serves_the_version_the_alias_points_to(tmp_path):
    registry = Registry(tmp_path / "registry")
    old, new = make_model("mlp"), MLP().eval()
    registry.register("digits-mlp", old)
    v2 = registry.register("digits-mlp", new)
    registry.set_alias("digits-mlp", "production", v2.version)
    predictor = export.Predictor.from_registry(registry, "digits-mlp", cache_dir=tmp_path / "cache")
    images = torch.rand(5, *SHAPES["mlp"])
    assert predictor.source == "digits-mlp v2" and v2.sha256[:16] in predictor.path.name
    assert (predictor.predict(images).labels == export.predict_logits(new, images).argmax(dim=1).numpy()).all()


def test_a_parity_failure_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "registry")
    registry.register("digits-mlp", make_model("mlp"))
    registry.set_alias("digits-mlp", "production", 1)

    def disagree(*args, **kwargs):
        raise ExportError("ONNX Runtime and PyTorch disagree")

    monkeypatch.setattr(export, "check_parity", disagree)
    with pytest.raises(ExportError, match="disagree"):
        export.Predictor.from_registry(registry, "digits-mlp", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no cached file, no staging folder
    monkeypatch.undo()
    predictor = export.Predictor.from_registry(registry, "digits-mlp", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [predictor.path.name,
                                                                        predictor.path.name + ".sha256"]


def test_a_pruned_model_that_has_taken_a_training_step_exports(tmp_path):
    from mvtk import compress

    model = compress.prune_global(make_model("mlp").train(), 0.5)
    images = torch.rand(4, *SHAPES["mlp"])
    torch.nn.functional.cross_entropy(model(images), torch.zeros(4, dtype=torch.long)).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    path = export.export_onnx(model, images, tmp_path / "pruned.onnx")
    assert export.check_parity(model, export.load_session(path), images).agreement == 1.0


def test_load_session_uses_torchs_thread_count_by_default(exported):
    session = export.load_session(exported["mlp"][1])
    assert session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    assert export.load_session(exported["mlp"][1], threads=1).get_session_options().intra_op_num_threads == 1


def test_engine_latencies_times_models_and_sessions_under_their_labels(exported):
    model, path = exported["mlp"]
    times = export.engine_latencies(torch.rand(2, *SHAPES["mlp"]), models={"eager": model},
                                    sessions={"fp32": export.load_session(path)}, repeats=3, warmup=1)
    assert list(times) == ["eager", "fp32"] and all(t > 0 for t in times.values())


def test_engine_latencies_rejects_a_label_used_twice(exported):
    model, path = exported["mlp"]
    with pytest.raises(InvalidArgumentError, match="its own label"):
        export.engine_latencies(torch.rand(2, *SHAPES["mlp"]), models={"x": model},
                                sessions={"x": export.load_session(path)})


@pytest.mark.parametrize("value_range", [5, (1.0, 0.0), ("a", "b"), (0.0, 0.5, 1.0)])
def test_predictor_rejects_a_value_range_that_is_not_low_high(served, value_range):
    with pytest.raises(InvalidArgumentError, match="value_range must be"):
        export.Predictor(served[2].path, value_range=value_range)


# -- issue 14: every file verified, no code run from a .pt2, clear errors -----------------------------------


def saved_pt2(tmp_path):
    return export.save_exported(make_model("mlp"), torch.rand(2, *SHAPES["mlp"]), tmp_path / "m.pt2")


def rewrite_zip(src, dst, replace):
    """Copy the zip `src` to `dst`, with `replace(name, data)` giving each entry's new bytes (None: keep)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info)
            new.writestr(info.filename, replace(info.filename, data) or data)
    return dst


def test_a_pt2_with_a_planted_sample_inputs_entry_is_refused_before_torch_runs_it(tmp_path, planted):
    payload, marker = planted
    hostile = rewrite_zip(saved_pt2(tmp_path), tmp_path / "hostile.pt2",
                          lambda name, data: payload.read_bytes() if name.endswith("sample_inputs/model.pt") else None)
    with pytest.raises(ExportError, match=r"hostile\.pt2.*sample_inputs/model\.pt"):
        export.load_exported(hostile)
    assert not marker.exists()


def test_a_pt2_with_a_pickled_weight_is_refused_before_torch_runs_it(tmp_path, planted):
    payload, marker = planted

    def replace(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            assert config["config"]["fc1.bias"]["path_name"] == "weight_1"
            config["config"]["fc1.bias"]["use_pickle"] = True
            return json.dumps(config).encode()
        return payload.read_bytes() if name.endswith("data/weights/weight_1") else None

    hostile = rewrite_zip(saved_pt2(tmp_path), tmp_path / "hostile.pt2", replace)
    with pytest.raises(ExportError, match=r"hostile\.pt2.*data/weights/weight_1"):
        export.load_exported(hostile)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["archive/../evil", "/archive/evil", "archive/data/aotinductor/model/x.so",
                                   "archive/extra_pickle.pt", "other/evil"])
def test_a_pt2_with_a_hostile_entry_is_refused(tmp_path, planted, entry):
    hostile = rewrite_zip(saved_pt2(tmp_path), tmp_path / "hostile.pt2", lambda name, data: None)
    with zipfile.ZipFile(hostile, "a") as archive:
        archive.writestr(entry, planted[0].read_bytes())
    with pytest.raises(ExportError, match="refused"):
        export.load_exported(hostile)
    assert not planted[1].exists()


def test_a_pt2_from_elsewhere_still_loads_when_it_is_clean(tmp_path):
    model = make_model("mlp")
    program = torch.export.export(model, (torch.rand(2, *SHAPES["mlp"]),))
    torch.export.save(program, tmp_path / "plain.pt2")  # no manifest: unverified, scanned
    images = torch.rand(2, *SHAPES["mlp"])
    torch.testing.assert_close(export.load_exported(tmp_path / "plain.pt2")(images), model(images))


def flip(path, at):
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_pt2_file_raises_integrity_error_naming_it(tmp_path):
    path = saved_pt2(tmp_path)
    assert (tmp_path / "m.pt2.sha256").read_text().endswith("  m.pt2\n")
    flip(path, len(path.read_bytes()) // 2)
    with pytest.raises(IntegrityError, match=r"m\.pt2"):
        export.load_exported(path)


@pytest.mark.parametrize("external", [False, True])
def test_a_flipped_byte_in_an_onnx_file_or_its_data_raises_integrity_error_naming_it(tmp_path, external):
    path = export.export_onnx(make_model("mlp"), torch.rand(2, *SHAPES["mlp"]), tmp_path / "m.onnx",
                              external_data=external)
    assert export.verify_manifest(path)
    target = tmp_path / ("m.onnx.data" if external else "m.onnx")
    flip(target, target.stat().st_size - 40)  # inside the last weights
    for use in (export.check_onnx, export.load_session, export.describe_onnx, export.Predictor):
        with pytest.raises(IntegrityError, match=target.name.replace(".", r"\.")):
            use(path)


def test_an_onnx_file_without_a_manifest_is_accepted_unverified(exported, tmp_path):
    copy_path = tmp_path / "elsewhere.onnx"
    copy_path.write_bytes(exported["mlp"][1].read_bytes())
    assert export.verify_manifest(copy_path) is False
    export.Predictor(copy_path)


def test_the_int8_copy_has_a_manifest_too(exported, tmp_path):
    dst = export.quantize_onnx(exported["mlp"][1], tmp_path / "int8.onnx")
    assert export.verify_manifest(dst)


def tamper_one_bias(path):
    proto = onnx.load(str(path))
    bias = next(t for t in proto.graph.initializer if "bias" in t.name and t.dims == [10])
    values = onnx.numpy_helper.to_array(bias).copy()
    values[3] += 100.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(path))


def test_predictor_rebuilds_a_tampered_cache_file(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.register("digits-mlp", make_model("mlp"))
    registry.set_alias("digits-mlp", "production", 1)
    first = export.Predictor.from_registry(registry, "digits-mlp", cache_dir=tmp_path / "cache")
    images = torch.rand(8, *SHAPES["mlp"])
    expected = first.predict(images)
    tamper_one_bias(first.path)
    edited = onnxruntime.InferenceSession(str(first.path), providers=["CPUExecutionProvider"])
    assert (edited.run(None, {"images": images.numpy()})[0].argmax(axis=1) == 3).all()  # the edit matters
    with pytest.raises(IntegrityError):
        export.Predictor(first.path)
    with pytest.warns(UserWarning, match="rebuilding"):
        again = export.Predictor.from_registry(registry, "digits-mlp", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.predict(images).labels, expected.labels)
    np.testing.assert_allclose(again.predict(images).probabilities, expected.probabilities)


def test_predictor_rebuilds_a_cache_file_made_from_other_weights(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.register("digits-mlp", make_model("mlp"))
    first = export.Predictor.from_registry(registry, "digits-mlp", alias=None, version=1, cache_dir=tmp_path / "c")
    other = export.export_onnx(MLP().eval(), torch.rand(2, *SHAPES["mlp"]), tmp_path / "other.onnx")
    first.path.write_bytes(other.read_bytes())  # another model's file, with a manifest that matches it
    (tmp_path / "c" / (first.path.name + ".sha256")).write_text(
        (tmp_path / "other.onnx.sha256").read_text().replace("other.onnx", first.path.name))
    with pytest.warns(UserWarning, match="other weights"):
        export.Predictor.from_registry(registry, "digits-mlp", alias=None, version=1, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("images, words", [
    (torch.rand(2, 1, 8, 8, dtype=torch.bfloat16), "bfloat16"),
    (torch.rand(2, 1, 8, 8, device="meta"), "meta tensor"),
    (torch.rand(2, 1, 8, 8).to_sparse(), "dense"),
    (torch.rand(2, 1, 8, 8, dtype=torch.complex64), "complex64"),
    (np.array([[object()]], dtype=object), "object"),
    (torch.tensor(0.5), r"got \(\)"),
    (np.array(0.5, dtype=np.float32), r"got \(\)"),
])
def test_predictor_names_what_is_wrong_with_unusual_tensors(served, images, words):
    with pytest.raises(InputShapeError, match=words):
        served[2].predict(images)


@pytest.mark.parametrize("call", [
    lambda p: export.check_onnx(3), lambda p: export.load_session(None), lambda p: export.describe_onnx(b"x"),
    lambda p: export.load_exported(5), lambda p: export.save_exported(make_model("mlp"), torch.rand(2, 1, 8, 8), 7),
    lambda p: export.export_onnx(make_model("mlp"), torch.rand(2, 1, 8, 8), p, metadata={"a": 1}),
    lambda p: export.onnx_size(1.5),
])
def test_wrong_types_get_mvtk_errors(tmp_path, call):
    with pytest.raises(InvalidArgumentError):
        call(tmp_path / "x.onnx")


def test_a_non_zip_pt2_gets_an_export_error(tmp_path):
    (tmp_path / "x.pt2").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match=r"x\.pt2"):
        export.load_exported(tmp_path / "x.pt2")


def test_a_full_disk_during_export_names_the_file_and_keeps_the_old_one(full_disk):
    small = export.export_onnx(make_model("mlp"), torch.rand(2, *SHAPES["mlp"]), full_disk / "m.onnx")
    before = small.read_bytes()
    (full_disk / "filler").write_bytes(b"x" * (256 * 1024 - 2 * len(before) - 8192))
    with pytest.raises(ExportError, match=r"m\.onnx.*(disk is full|ENOSPC)"):
        export.export_onnx(make_model("cnn"), torch.rand(2, *SHAPES["cnn"]), full_disk / "m.onnx")
    assert small.read_bytes() == before and export.verify_manifest(small)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "m.onnx", "m.onnx.sha256"]
    with pytest.raises(ExportError, match=r"b\.pt2.*(disk is full|ENOSPC)"):
        export.save_exported(make_model("cnn"), torch.rand(2, *SHAPES["cnn"]), full_disk / "b.pt2")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "m.onnx", "m.onnx.sha256"]


# -- issue 15: the Predictor's input, names and post-processing are declared, not guessed -------------------------


def test_course_models_keep_their_graph_names_and_other_models_get_generic_ones():
    assert export.io_names(make_model("mlp")) == ("images", "logits")
    assert export.io_names(torch.nn.Linear(3, 2)) == ("input", "output")
    assert export.io_names(torch.nn.Linear(3, 2), "features", "price") == ("features", "price")
    with pytest.raises(InvalidArgumentError, match="input_name"):
        export.io_names(torch.nn.Linear(3, 2), "")


def test_a_course_file_keeps_the_pixel_range_and_the_classifier(exported):
    predictor = export.Predictor(exported["mlp"][1])
    assert predictor.value_range == (0.0, 1.0) and predictor.task == "classification"
    assert isinstance(predictor.predict(torch.rand(2, 1, 8, 8)), export.Prediction)


def test_declared_settings_are_recorded_in_the_file_and_read_back(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.rand(4, 3)
    made = export.Predictor.from_model(model, x, tmp_path / "m.onnx", value_range=(-1, 1), task="classification",
                                       input_name="features")
    again = export.Predictor(made.path)
    assert (again.input_name, again.output_name, again.value_range, again.task) == ("features", "output", (-1, 1),
                                                                                    "classification")
    with pytest.raises(InputShapeError, match=r"expects values in \[-1, 1\]"):
        again.predict(x + 5)


def test_post_processing_is_the_callers_choice(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.rand(4, 3)
    path = export.Predictor.from_model(model, x, tmp_path / "m.onnx").path
    expected = model(x).detach().numpy()
    assert export.Predictor(path).task is None
    np.testing.assert_allclose(export.Predictor(path).predict(x), expected, rtol=1e-4, atol=1e-6)  # raw outputs
    top = export.Predictor(path, postprocess=lambda out: out.argmax(axis=1)).predict(x)
    assert (top == expected.argmax(axis=1)).all()
    with pytest.raises(InvalidArgumentError, match="task must be"):
        export.Predictor(path, task="ranking")


def test_an_integer_input_is_served_with_its_own_dtype(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 1))
    tokens = torch.randint(0, 10, (4, 3))
    predictor = export.Predictor.from_model(model, tokens, tmp_path / "m.onnx", task="regression")
    assert predictor.dtype == np.int64 and predictor.predict(tokens).shape == (4, 1)
    with pytest.raises(InputShapeError, match=r"expects int64 inputs, got float32; convert with inputs.long\(\)"):
        predictor.predict(tokens.float())


# -- a manifest path that is not a regular file is never "no manifest" ---------------------------------------------


INTRUDERS = ["folder", "symlink", "fifo"]


@pytest.mark.parametrize("intruder", INTRUDERS)
def test_a_pt2_whose_manifest_is_not_a_regular_file_is_refused_not_loaded_unverified(tmp_path, intruder,
                                                                                     put_in_the_way):
    path = saved_pt2(tmp_path)
    put_in_the_way(export.manifest_path(path), intruder)
    with pytest.raises(IntegrityError, match=r"m\.pt2\.sha256' should be the SHA-256 manifest of m\.pt2 but is a"):
        export.load_exported(path)


@pytest.mark.parametrize("intruder", INTRUDERS)
def test_an_onnx_file_whose_manifest_is_not_a_regular_file_is_refused_not_used_unverified(exported, tmp_path,
                                                                                        intruder, put_in_the_way):
    path = tmp_path / "m.onnx"
    path.write_bytes(exported["mlp"][1].read_bytes())
    export.write_manifest(path)
    put_in_the_way(export.manifest_path(path), intruder)
    for use in (export.verify_manifest, export.check_onnx, export.load_session, export.describe_onnx,
                export.Predictor):
        with pytest.raises(IntegrityError, match=r"m\.onnx\.sha256' should be the SHA-256 manifest of m\.onnx"):
            use(path)


def test_saving_where_a_folder_stands_in_the_manifests_place_writes_nothing(tmp_path):
    (tmp_path / "m.pt2.sha256").mkdir()
    with pytest.raises(ExportError, match=r"m\.pt2\.sha256': it is a folder"):
        saved_pt2(tmp_path)
    assert not (tmp_path / "m.pt2").exists()


# -- static int8 (ONNX Runtime QDQ, PT2E) and the measured map -------------------------------------------------


def conv_net():
    """Not a course model: a plain nn.Sequential CNN for 8x8 images."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 8 * 8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).eval()


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory):
    model = conv_net()
    return model, export.export_onnx(model, torch.rand(2, 1, 8, 8), tmp_path_factory.mktemp("conv") / "conv.onnx")


@pytest.mark.parametrize("name", SHAPES)
def test_static_int8_copy_is_smaller_quantizes_conv_and_matmul_and_agrees_with_fp32(exported, tmp_path, name):
    model, path = exported[name]
    images = torch.rand(64, *SHAPES[name])
    static = export.quantize_onnx_static(path, tmp_path / "static.onnx", images[:32])
    summary = export.describe_onnx(static)
    assert summary.operators.get("QuantizeLinear", 0) > 0 and summary.operators.get("DequantizeLinear", 0) > 0
    assert export.onnx_size(path) / export.onnx_size(static) >= 2.5 and export.verify_manifest(static)
    fp32, int8 = (export.run_onnx(export.load_session(p), images) for p in (path, static))
    assert np.mean(fp32.argmax(axis=1) == int8.argmax(axis=1)) >= 0.9


def test_static_int8_works_on_a_model_that_is_not_a_course_model(conv_onnx, tmp_path):
    model, path = conv_onnx
    static = export.quantize_onnx_static(path, tmp_path / "conv_static.onnx", torch.rand(16, 1, 8, 8).numpy())
    assert export.describe_onnx(static).inputs == [("input", ("batch", 1, 8, 8), "float32")]
    assert export.run_onnx(export.load_session(static), torch.rand(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("calibration, words", [
    (torch.rand(8, 1, 16, 16), "shaped like"),     # the CNN's images sent to an 8x8 model
    (torch.rand(0, 1, 8, 8), "non-empty"),
    (torch.full((4, 1, 8, 8), float("nan")), "NaN"),
    ([[0.5] * 8] * 8, "numpy array"),
])
def test_static_int8_refuses_bad_calibration_and_writes_nothing(conv_onnx, tmp_path, calibration, words):
    with pytest.raises(InvalidArgumentError, match=words):
        export.quantize_onnx_static(conv_onnx[1], tmp_path / "static.onnx", calibration)
    assert not list(tmp_path.iterdir())


def test_static_int8_names_a_missing_or_corrupt_source(tmp_path):
    with pytest.raises(ExportError, match="no ONNX file"):
        export.quantize_onnx_static(tmp_path / "missing.onnx", tmp_path / "out.onnx", torch.rand(4, 1, 8, 8))
    (tmp_path / "corrupt.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="corrupt.onnx is not a valid ONNX model"):
        export.quantize_onnx_static(tmp_path / "corrupt.onnx", tmp_path / "out.onnx", torch.rand(4, 1, 8, 8))
    assert not (tmp_path / "out.onnx").exists()


def test_static_int8_refuses_a_destination_without_the_onnx_suffix(conv_onnx, tmp_path):
    with pytest.raises(InvalidArgumentError, match=".onnx"):
        export.quantize_onnx_static(conv_onnx[1], tmp_path / "out.bin", torch.rand(4, 1, 8, 8))


def test_calibration_images_are_drawn_from_the_given_split_by_seed():
    images = torch.arange(100, dtype=torch.float32).reshape(100, 1, 1, 1)
    first, again, other = (export.calibration_images(images, 16, seed=s) for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(set(first.flatten().tolist())) == 16 and set(first.flatten().tolist()) <= set(range(100))
    with pytest.raises(InvalidArgumentError, match="holds only 100"):
        export.calibration_images(images, 101)


@pytest.mark.parametrize("make, shape", [(lambda: make_model("cnn"), (1, 16, 16)), (conv_net, (1, 8, 8))])
def test_pt2e_int8_model_keeps_int8_weights_only_and_agrees_with_fp32(make, shape):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = export.quantize_pt2e(model, torch.rand(32, *shape))
    state = int8.state_dict()
    assert any(v.dtype == torch.int8 for v in state.values())
    assert not any(v.dtype == torch.float32 and v.dim() >= 2 for v in state.values())  # no float weight matrix left
    images = torch.rand(7, *shape)  # a batch size it was not calibrated with: the batch stays dynamic
    with torch.no_grad():
        agree = (int8(images).argmax(1) == model(images).argmax(1)).float().mean()
    assert agree >= 0.7 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pt2e_refuses_calibration_the_model_cannot_take():
    with pytest.raises(InvalidArgumentError, match="does not fit SmallCNN"):
        export.quantize_pt2e(make_model("cnn"), torch.rand(4, 1, 8, 8))
    with pytest.raises(InvalidArgumentError, match="non-empty batch"):
        export.quantize_pt2e(make_model("cnn"), torch.rand(0, 1, 16, 16))


def tiny_loaders():
    from torch.utils.data import DataLoader, TensorDataset

    from mvtk.data import Loaders

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(96, 1, 8, 8, generator=generator), torch.randint(0, 10, (96,), generator=generator)
    split = [TensorDataset(images[i:i + 32], labels[i:i + 32]) for i in (0, 32, 64)]
    return Loaders(*(DataLoader(part, batch_size=16) for part in split))


MAP_FEW = ("fp32", "torchao int8 dynamic", "PT2E int8 static", "ORT fp32", "ORT int8 static")


@pytest.fixture(scope="module")
def small_map(tmp_path_factory):
    return export.deployment_map("conv", conv_net, tiny_loaders(), epochs=1, seeds=(0, 1), paths=MAP_FEW,
                                 calibration_size=16, repeats=2, folder=tmp_path_factory.mktemp("map"))


def test_the_map_measures_every_path_asked_for_over_every_seed(small_map):
    assert [e.path for e in small_map] == list(MAP_FEW) and {e.model for e in small_map} == {"conv"}
    for entry in small_map:
        assert len(entry.accuracies) == 2 and all(0 <= a <= 1 for a in entry.accuracies)
        assert entry.gzip_bytes > 0 and set(entry.latency_ms) == set(export.MAP_BATCHES)
        assert entry.spread == max(entry.accuracies) - min(entry.accuracies)
    fp32 = small_map[0]
    assert fp32.speedup == {b: 1.0 for b in export.MAP_BATCHES}
    sizes = {e.path: e.gzip_bytes for e in small_map}
    assert sizes["fp32"] / sizes["ORT int8 static"] >= 2 and sizes["fp32"] / sizes["PT2E int8 static"] >= 2


def test_the_map_table_and_figure_show_every_path(small_map):
    import matplotlib

    matplotlib.use("Agg")
    table = export.map_table(small_map)
    assert all(e.path in table for e in small_map) and "gzip KiB" in table
    (ax,) = export.plot_map(small_map)
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "conv"


@pytest.mark.parametrize("paths", [("ORT fp32",), ("fp32", "int4 magic")])
def test_the_map_refuses_unknown_paths_and_needs_fp32(tmp_path, paths):
    with pytest.raises(InvalidArgumentError, match="paths must include 'fp32'"):
        export.deployment_map("conv", conv_net, tiny_loaders(), epochs=1, paths=paths, folder=tmp_path)


# --- refusals found by an outside tester: dst is src, int8 of int8, NaN or one-image calibration -----------

@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_int8_onnx_refuses_to_overwrite_its_source_by_any_spelling(conv_onnx, tmp_path, static):
    src = conv_onnx[1]
    before = src.read_bytes()
    (tmp_path / "link.onnx").symlink_to(src)
    for dst in (src, src.parent / "." / src.name, tmp_path / "link.onnx"):
        with pytest.raises(InvalidArgumentError, match="is the source model"):
            if static:
                export.quantize_onnx_static(src, dst, torch.rand(4, 1, 8, 8))
            else:
                export.quantize_onnx(src, dst)
    assert src.read_bytes() == before


def test_int8_onnx_refuses_an_already_quantized_source_naming_it(conv_onnx, tmp_path):
    static = export.quantize_onnx_static(conv_onnx[1], tmp_path / "static.onnx", torch.rand(8, 1, 8, 8))
    dynamic = export.quantize_onnx(conv_onnx[1], tmp_path / "dynamic.onnx")
    for src in (static, dynamic):
        with pytest.raises(InvalidArgumentError, match=rf"{src.name} is already quantized .*QuantizeLinear"):
            export.quantize_onnx_static(src, tmp_path / "again.onnx", torch.rand(8, 1, 8, 8))
        with pytest.raises(InvalidArgumentError, match=rf"{src.name} is already quantized"):
            export.quantize_onnx(src, tmp_path / "again.onnx")
    assert not (tmp_path / "again.onnx").exists()


def test_pt2e_refuses_an_int8_or_meta_model_and_nan_calibration():
    int8 = export.quantize_pt2e(conv_net(), torch.rand(8, 1, 8, 8))
    with pytest.raises(InvalidArgumentError, match="already quantized"):
        export.quantize_pt2e(int8, torch.rand(8, 1, 8, 8))
    with torch.device("meta"):
        meta = MLP(hidden=16)
    with pytest.raises(InvalidArgumentError, match="meta device"):
        export.quantize_pt2e(meta, torch.rand(4, 1, 8, 8))
    calibration = torch.rand(4, 1, 8, 8)
    calibration[1, 0, 0, :3] = float("nan")
    with pytest.raises(InvalidArgumentError, match="finite values; it holds 3 NaN/inf"):
        export.quantize_pt2e(conv_net(), calibration)


def test_pt2e_calibrates_on_one_image_and_keeps_the_batch_dynamic():
    model = conv_net()
    int8 = export.quantize_pt2e(model, torch.rand(1, 1, 8, 8))
    images = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        logits = int8(images)
        assert logits.shape == (5, 10) and (logits.argmax(1) == model(images).argmax(1)).float().mean() >= 0.6


def test_the_map_checks_its_folder_before_training(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(InvalidArgumentError, match="is a file"):
        export.deployment_map("conv", lambda: pytest.fail("trained before checking the folder"), tiny_loaders(),
                              epochs=1, folder=tmp_path / "a_file")


# --- issue 17: compact int8 files, and neurons removed (chosen on validation) + ONNX Runtime int8 ------------

@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_int8_onnx_drops_node_metadata_and_unused_opsets_but_not_what_runs(conv_onnx, tmp_path, static):
    import onnx

    def quantize(dst, compact):
        if static:
            return export.quantize_onnx_static(conv_onnx[1], dst, torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                                               compact=compact)
        return export.quantize_onnx(conv_onnx[1], dst, compact=compact)
    full, compact = quantize(tmp_path / "full.onnx", False), quantize(tmp_path / "compact.onnx", True)
    proto = onnx.load(compact)
    assert any(node.metadata_props for node in onnx.load(full).graph.node)
    assert not any(node.metadata_props or node.doc_string for node in proto.graph.node)
    used = {node.domain for node in proto.graph.node}
    assert {o.domain for o in proto.opset_import} <= used | {""}
    assert export.onnx_size(compact) < export.onnx_size(full) and export.verify_manifest(compact)
    images = torch.rand(16, 1, 8, 8)
    np.testing.assert_array_equal(*(export.run_onnx(export.load_session(p), images) for p in (full, compact)))


def test_the_map_removes_the_neurons_validation_data_allows_and_says_how_many(tmp_path):
    def build():
        return MLP(hidden=32)

    entries = export.deployment_map("mlp", build, tiny_loaders(), epochs=1, seeds=(0, 1), repeats=2, folder=tmp_path,
                                    paths=("fp32", "ORT int8 dynamic", "neurons removed + ORT int8"))
    dynamic, removed = entries[1], entries[2]
    assert removed.path == "neurons removed + ORT int8" and len(removed.accuracies) == 2
    assert "of fc1's neurons removed per seed" in removed.detail and "validation" in removed.detail
    fractions = [float(f) / 100 for f in removed.detail.split(" of ")[0].replace("%", "").split(", ")]
    assert len(fractions) == 2 and all(f == 0 or f in export.MAP_NEURON_FRACTIONS for f in fractions)
    assert removed.gzip_bytes <= dynamic.gzip_bytes
    assert removed.detail in export.map_table(entries) and not dynamic.detail


def test_static_int8_keeps_a_shallow_conv_float_unless_told_and_refuses_a_bad_depth(conv_onnx, tmp_path):
    import onnx

    def float_convs(path):  # Conv nodes whose weight is a plain initializer, not dequantized int8
        proto = onnx.load(path)
        dequantized = {out for node in proto.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
        return [node.name for node in proto.graph.node if node.op_type == "Conv" and node.input[1] not in dequantized]
    calibration = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    default = export.quantize_onnx_static(conv_onnx[1], tmp_path / "default.onnx", calibration)  # 1 x 3 x 3 = 9 < 32
    every = export.quantize_onnx_static(conv_onnx[1], tmp_path / "every.onnx", calibration, min_conv_depth=1)
    assert export.MIN_INT8_CONV_DEPTH > 9 and len(float_convs(default)) == 1 and float_convs(every) == []
    assert export.describe_onnx(default).operators.get("QuantizeLinear", 0) > 0  # the linear layers are int8
    images = torch.rand(32, 1, 8, 8)
    fp32, int8 = (export.run_onnx(export.load_session(p), images) for p in (conv_onnx[1], default))
    assert np.mean(fp32.argmax(axis=1) == int8.argmax(axis=1)) >= 0.9
    with pytest.raises(InvalidArgumentError, match="min_conv_depth"):
        export.quantize_onnx_static(conv_onnx[1], tmp_path / "bad.onnx", calibration, min_conv_depth=0)
    assert not (tmp_path / "bad.onnx").exists()
