"""The embedded tiny model's generator: its synthetic world and its closed-vocabulary tokenizer."""
