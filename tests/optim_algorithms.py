"""torch.optim class name -> the built-in gradpipe pipeline that follows it: the table that
tests/test_optimizer_info.py (torch's configurations) and tests/test_optimizer_behaviour.py
(torch's behavioural checks) run over."""

ALGORITHMS = {"Adam": "adam", "AdamW": "adamw", "SGD": "sgd", "RMSprop": "rmsprop", "Adamax": "adamax",
              "NAdam": "nadam", "RAdam": "radam", "Adagrad": "adagrad", "Adadelta": "adadelta", "Rprop": "rprop",
              "Adafactor": "adafactor", "ASGD": "asgd"}
