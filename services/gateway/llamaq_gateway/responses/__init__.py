"""OpenAI's Responses API (`/v1/responses`) on llamaq jobs: a response is a job whose record also carries its
request, input and conversation, so background responses are durable and resume by sequence number. The routes are
in routers/responses.py; here, by concern:

- requests.py: the request body (pydantic)
- params.py: input items and settings as the job's GenerationParams, with the refusals (400) of what does not apply
- store.py: the response's fields in its job record, loading it for its key, the conversation it continues
- render.py: the response object and its output items
- streaming.py: its events, numbered alike on every reading of the job's stream
- service.py: create, retrieve (or stream again), cancel, delete, list input items
"""
