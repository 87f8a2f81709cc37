"""The bottom of the house: what replicas (`actors`) and jobs (`pipelines`) both need.

Errors a user can fix, failpoints for crash tests, column names that cross stages, the model cache.
Imports neither `actors` nor `pipelines`, never ray or torch."""
