"""The pretraining recipe: config schemas, models, data, optimizer factory, trainer, checkpoints, metrics."""
