"""Instruction finetuning: the base model and its tokenizer (`base`), and the driver that
checks the instruction data, opens the MLflow child run and launches the same Ray Train
workers as pretraining (`driver`, with the `llamaray finetune` command). The worker side
lives in its layers: reading, templating and masking examples in `data.instructions`,
their batches in `train.batches`, the base's weights into the sharded model in
`train.base_weights`."""
