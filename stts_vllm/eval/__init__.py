"""`stts-vllm eval`: a procedural video-QA split through vLLM (offline) or through the server.

Every method runs at equal video-token budget on the same weights (`config.METHODS`), so the
table says what each buys. One module per reason to change:

- `config`: `EvalConfig`, what one evaluation runs (the CLI builds it from its flags);
- `modes`: the table's rows (`Mode`) and the clips each row asks about;
- `runners`: the engines that answer a row: offline vLLM, the server over HTTP, and the
  transformers training model to check vLLM against;
- `report`: scoring, Wilson intervals, the text tables and `eval.json`;
- `plots`: the accuracy bar plots (`eval.png`);
- `run`: `run_eval(config)`, the whole evaluation.

Importing the package imports nothing heavy; `run` pulls in the engines.
"""
