# Pushes jobs the way the deferred-event bundle's Sidekiq backend does, with the real Sidekiq
# client: Sidekiq::Client.push("class" => "DeferEvent", "queue" => Q, "args" => [data]).
#
#   ruby sidekiq_push.rb REDIS_URL QUEUE DATA_FILE [RETRY]
#
# DATA_FILE holds one event data text per line; RETRY (optional) is the job's "retry" option:
# "false" or a number. Prints the number of jobs pushed.
require "sidekiq"

url, queue, data_file, retry_option = ARGV
Sidekiq.configure_client { |config| config.redis = { url: url } }
Sidekiq.logger.level = Logger::WARN

pushed = 0
File.foreach(data_file) do |line|
  data = line.chomp
  next if data.empty?
  job = { "class" => "DeferEvent", "queue" => queue, "args" => [data] }
  job["retry"] = (retry_option == "false" ? false : Integer(retry_option)) if retry_option
  raise "push failed" unless Sidekiq::Client.push(job)
  pushed += 1
end
puts pushed
