# Reads what Sidekiq's own API sees, as one JSON object: the dead and retry sets' jobs, the
# queue's size and the processed/failed stats. Proves that the failure records fastworker
# writes are what Sidekiq (and so its web UI) reads.
#
#   ruby sidekiq_sets.rb REDIS_URL QUEUE
require "json"
require "sidekiq"
require "sidekiq/api"

url, queue = ARGV
Sidekiq.configure_client { |config| config.redis = { url: url } }
Sidekiq.logger.level = Logger::WARN

def entry(job)
  {
    "klass" => job.klass,
    "display_class" => job.display_class,
    "args" => job.args,
    "queue" => job.queue,
    "jid" => job.jid,
    "error_message" => job["error_message"],
    "error_class" => job["error_class"],
    "retry_count" => job["retry_count"],
    "failed_at" => job["failed_at"],
    "retried_at" => job["retried_at"],
    "at" => job.at.to_f,
  }
end

stats = Sidekiq::Stats.new
puts JSON.generate(
  "dead" => Sidekiq::DeadSet.new.map { |job| entry(job) },
  "retry" => Sidekiq::RetrySet.new.map { |job| entry(job) },
  "scheduled" => Sidekiq::ScheduledSet.new.size,
  "queue_size" => Sidekiq::Queue.new(queue).size,
  "processed" => stats.processed,
  "failed" => stats.failed,
)
