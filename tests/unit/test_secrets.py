"""No secret leaves the process (no Ray): a tracking URI with credentials, against a real
`mlflow server`, never shows its password in MLflow params, config.yaml, sweep.yaml,
best.yaml or console output; and the sweep's persisted Tune state in S3 (moto's server)
holds no AWS secret key from the driver's environment."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_checkpoint import SEQ_LEN, write_token_corpus

from llamaray import storage, tracking
from llamaray.cli import main
from llamaray.config import ConfigError, load_config

PASSWORD = "pw-4f9c-never-shown"


def test_redact_removes_credentials_from_uris_and_text():
    redact = tracking.redact
    assert redact(f"http://alice:{PASSWORD}@mlflow:5000") == "http://***@mlflow:5000"
    assert redact(f"https://token:{PASSWORD}@host/path") == "https://***@host/path"
    assert (
        redact(f"postgresql://u:p@{PASSWORD}@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    )
    assert redact(f"mysql://db/m?password={PASSWORD}&ssl=1") == "mysql://db/m?password=***&ssl=1"
    text = f"API request to http://a:{PASSWORD}@h:5000/api/2.0/x failed; see http://h/ui"
    assert redact(text) == "API request to http://***@h:5000/api/2.0/x failed; see http://h/ui"
    for plain in ("http://mlflow:5000", "sqlite:////runs/mlflow.db", "s3://b/k", None, ""):
        assert redact(plain) == plain


@pytest.mark.slow  # make test only: a real mlflow server
def test_a_credentialed_tracking_uri_is_never_shown_or_recorded(
    mlflow_server, loopback_port, monkeypatch, tmp_path, capsys
):
    from llamaray.orchestrate.pretrain import open_tracking, read_manifest
    from llamaray.sweep.config import load_sweep_config, resolve_space
    from llamaray.sweep.driver import open_parent, report_sweep
    from llamaray.sweep.report import TrialOutcome

    port = mlflow_server.uri.rsplit(":", 1)[1]
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{port}"  # the server takes any basic auth
    shown = f"http://***@127.0.0.1:{port}"
    corpus = str(write_token_corpus(tmp_path / "corpus"))
    settings = [f"output_dir={tmp_path}", f"tracking.uri={uri}", "model.preset=debug",
                f"train.seq_len={SEQ_LEN}", "train.steps=4", "train.eval_every=2",
                f"data.corpus={corpus}", "sweep.lr.values=[1e-3]", "sweep.batch_tokens=[64]",
                "sweep.num_samples=1"]  # fmt: skip
    client = MlflowClient(mlflow_server.uri)

    # A run: its params and config.yaml.
    cfg = load_config(None, ["name=secret-run", *settings[:-3]])
    _, run_id = open_tracking(cfg, corpus, read_manifest(corpus), None)
    run = client.get_run(run_id)
    assert run.data.params["tracking.uri"] == shown
    config_yaml = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    recorded = [json.dumps(run.data.params), Path(config_yaml).read_text()]
    assert shown in recorded[1]

    # A sweep: its params and sweep.yaml, then best.yaml in MLflow and in storage.
    sweep_run, sweep = load_sweep_config(None, ["name=secret-sweep", *settings])
    parent = open_parent(sweep_run, sweep, resolve_space(sweep_run, sweep), uri)
    best = TrialOutcome("t_0", "secret-sweep-t_0", 1e-3, 64, 4, 4, 3.5, "finished", None, None)
    result = report_sweep(sweep_run, [best], uri, parent, corpus, resumed=False)
    for name in ("sweep.yaml", "best.yaml"):
        path = client.download_artifacts(parent, name, str(tmp_path / "dl"))
        recorded.append(Path(path).read_text())
    recorded.append(storage.read_text(result.best_yaml))
    recorded.append(json.dumps(client.get_run(parent).data.params))
    assert shown in recorded[-2]

    # The console: --print-config of train and sweep, and rank 0's tracker when its server
    # is away (its warnings name the server).
    assert main(["train", "--print-config", *settings[:-3]]) == 0
    assert main(["sweep", "--print-config", *settings]) == 0
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refusal is final at once
    away = f"http://alice:{PASSWORD}@127.0.0.1:{loopback_port()}"
    logger = tracking.MetricLogger(away, run_id, system_metrics=False, flush_s=0.2)
    logger.log({"loss": 1.0}, 1)
    logger.finish()
    console = capsys.readouterr()
    recorded += [console.out, console.err]
    assert console.out.count(shown) == 2 and "http://***@127.0.0.1" in console.err

    for text in recorded:
        assert PASSWORD not in text and "alice:" not in text

    # best.yaml, trained as it is, is refused with the fix rather than logging in as `***`.
    (tmp_path / "best.yaml").write_text(recorded[3])
    best_cfg = load_config(tmp_path / "best.yaml", [])
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        tracking.tracking_uri(best_cfg.tracking.uri, best_cfg.output_dir)


SECRET_KEY = "sweep-secret-key-8d2e-never-persisted"


def test_the_sweeps_persisted_tune_state_holds_no_aws_secret_key(s3_client, monkeypatch):
    """Tune writes tuner.pkl when the Tuner is made (no Ray needed) and each trial's state,
    with its storage context, into experiment_state-*.json: with the driver's static keys
    in its environment, neither holds the secret key, and the state still reaches S3 with
    the credentials of the process that reads it."""
    from ray import tune
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment.trial import Trial

    from llamaray.sweep.driver import sweep_state_location

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASWEEPDRIVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    s3_client.create_bucket(Bucket="sweep-state")
    location, fs = sweep_state_location("s3://sweep-state/sweeps")

    tune.Tuner(
        lambda config: None,
        run_config=tune.RunConfig(name="sw", storage_path=location, storage_filesystem=fs),
    )
    tuner_pkl = s3_client.get_object(Bucket="sweep-state", Key="sweeps/sw/tuner.pkl")["Body"]
    tuner_pkl = tuner_pkl.read()
    trial = Trial("trial", stub=True, config={"lr": 1e-3},
                  storage=StorageContext(location, "sw", storage_filesystem=fs))  # fmt: skip
    trial_state = trial.get_json_state()[0].encode()  # what experiment_state-*.json holds

    secret = SECRET_KEY.encode()
    for persisted in (tuner_pkl, trial_state):
        assert secret not in persisted and secret.hex().encode() not in persisted

    # Restored where no keys are forwarded, the state signs with this process's own chain.
    restored = pickle.loads(tuner_pkl)["_run_config"].storage_filesystem
    storage.put_bytes(restored, "sweep-state/sweeps/sw/probe", b"ok")
    assert s3_client.get_object(Bucket="sweep-state", Key="sweeps/sw/probe")["Body"].read() == b"ok"
    assert secret not in pickle.dumps(restored)  # and saved again, still none
