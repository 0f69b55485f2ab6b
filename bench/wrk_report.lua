-- wrk's report for bench/process.py: latency percentiles in microseconds and the request and error counts.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("p50_us %d\np99_us %d\nrequests %d\nerrors %d\n",
    latency:percentile(50), latency:percentile(99), summary.requests,
    e.connect + e.read + e.write + e.status + e.timeout))
end
