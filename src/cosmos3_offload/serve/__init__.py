"""`cosmos3-offload serve`: one loaded model behind an OpenAI-style HTTP job API and a web page.

- `api_errors`: the OpenAI error body and the statuses the API answers with;
- `requests`: a request's fields (JSON or a form) checked and turned into a GenerationConfig;
- `store`: the jobs in SQLite and their files under --storage, kept across restarts;
- `queue`: the bounded FIFO and the one worker thread that runs jobs on the model;
- `metrics`: the Prometheus text of /metrics;
- `api`: the FastAPI app (routes, the bearer key, error handlers) and the page;
- `server`: load, listen, stop cleanly.
"""
