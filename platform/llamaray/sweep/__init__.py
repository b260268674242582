"""Ray Tune sweeps of learning rate and batch size: a run config plus a `sweep:` section
(`config`), each trial one pretraining run under Tune (`trial`), the summary, plot and
best.yaml (`report`), and the driver that runs or resumes a sweep (`driver`)."""
