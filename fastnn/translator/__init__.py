"""Korean→English translation with fastnn's kernels: data, tokenizer, models, training and search.

Command line: ``fastnn-translate`` or ``python -m fastnn.translator`` (see ``__main__.py``); configuration in
``default.yaml``. Library use::

    from fastnn.translator import config, train
    result = train.train(config.load(sets=["train.epochs=2"]))
"""
