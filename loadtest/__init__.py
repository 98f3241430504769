"""Load generator for the completion server: course-schedule replay, closed loop, grading, report.

Run it as `python -m loadtest {replay,closed} --url URL --out DIR ...`; see `__main__.py`.
"""
