"""OpenAI's Batch API (`/v1/files`, `/v1/batches`): the uploaded files (`files`, their bytes on disk in
`file_blobs`) and the batches that run their lines as batch-priority jobs (`batches`: validation, the fenced driver,
the output and error files, and the Lua scripts on the batches' own keys); `requests`: the request body of
`POST /v1/batches`. The routes are in `routers/batch_api.py`."""
