"""OpenAI's Batch API (`/v1/files`, `/v1/batches`): the uploaded files (`files`, their bytes on disk in
`file_blobs`) and the batches that run their lines as batch-priority jobs (`batches`: validation, the fenced driver,
the output and error files). The routes are in `routers/batch_api.py`."""
