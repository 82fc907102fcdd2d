"""The gateway: Clearhouse's one public door.

It authenticates API keys, checks scopes, limits rates and body sizes, signs the internal
token each service verifies, routes the contract's paths to the service that owns them
and composes answers that span services (the payment timeline, embedded approval and
ledger hold). It holds no business rules of the services behind it and must never let a
request reach a service on the strength of anything but a key it verified itself.
"""
