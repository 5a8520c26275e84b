"""llamaq HTTP gateway: validates requests, queues jobs on Redis with RQ, answers from Redis. Never imports torch."""
