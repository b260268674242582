"""Ray on the outside of training: the driver that prepares data and tracking and launches
Ray Train (`pretrain`), and the thin per-worker adapter (`ray_worker`)."""
