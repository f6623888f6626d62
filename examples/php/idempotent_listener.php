<?php
// dispatch.php with an idempotent listener: the job id fastworker passes on every attempt lets a
// listener do its work once, however often the job runs.
//
// fastworker delivers at least once. A job can run again after it did its work: a retry after
// a timeout whose first run had in fact finished, a worker killed before its ack, a
// `fastworker dlq replay`. FASTWORKER_JOB_ID is the same on each of those runs (the AMQP
// message_id, else a hash of the message body; a Sidekiq job's jid), so a listener can remember
// which jobs it has done and skip the repeats.
//
// With a database, claim the id in the same transaction as the job's own writes, under a unique
// key, so that "done" and "recorded as done" can never come apart:
//
//   $pdo->beginTransaction();
//   $claim = $pdo->prepare('INSERT INTO processed_jobs (job_id) VALUES (?) ON CONFLICT DO NOTHING');
//   $claim->execute([$job->id]);
//   if ($claim->rowCount() === 0) {       // done by an earlier run: nothing to do
//       $pdo->rollBack();
//       return;
//   }
//   ... the job's own writes ...
//   $pdo->commit();                        // an exception rolls both back: the retry redoes it
//
// This example has no database: it keeps a marker file per job id in FASTWORKER_DEMO_DONE_DIR
// (default /tmp/fastworker-demo-done), written once the work is done, under an exclusive lock
// on the id, so that two runs of one job at the same time (two FPM children) do not both do
// it. A crash between the work and the marker can still repeat it; the transaction above
// closes that gap.
//
// Run it as the worker's --script (it takes the same messages as dispatch.php).

declare(strict_types=1);

require __DIR__ . '/listeners.php';

/** What fastworker tells a job about itself, in $_SERVER on every attempt. */
final class JobContext
{
    public function __construct(
        public readonly string $id,               // FASTWORKER_JOB_ID: the same on every attempt
        public readonly int $attempt,             // FASTWORKER_ATTEMPT: 1 on the first run
        public readonly string $queue,            // FASTWORKER_QUEUE
        public readonly ?float $firstEnqueued,    // FASTWORKER_FIRST_ENQUEUED (unix time), if known
        public readonly ?string $traceparent,     // HTTP_TRACEPARENT (W3C), if the publisher set one
    ) {
    }

    /** The context of this request, or null when fastworker did not send it. */
    public static function fromServer(array $server): ?self
    {
        if (!isset($server['FASTWORKER_JOB_ID'])) {
            return null;
        }
        $first = $server['FASTWORKER_FIRST_ENQUEUED'] ?? null;
        return new self(
            $server['FASTWORKER_JOB_ID'],
            (int) ($server['FASTWORKER_ATTEMPT'] ?? 1),
            $server['FASTWORKER_QUEUE'] ?? '',
            $first === null ? null : (float) $first,
            $server['HTTP_TRACEPARENT'] ?? null,
        );
    }
}

final class IdempotentOrderListener
{
    private OrderLogListener $inner;
    private string $doneDir;

    public function __construct(private ?JobContext $job)
    {
        $this->inner = new OrderLogListener();
        $dir = getenv('FASTWORKER_DEMO_DONE_DIR', true);
        $this->doneDir = ($dir !== false && $dir !== '') ? $dir : '/tmp/fastworker-demo-done';
    }

    public function onOrderPlaced(OrderPlaced $event): void
    {
        if ($this->job === null) {
            $this->inner->onOrderPlaced($event);   // not run by fastworker: no id to go by
            return;
        }
        // The id is the publisher's message_id when it set one: any text, so hash it for a name.
        if (!is_dir($this->doneDir)) {
            @mkdir($this->doneDir, 0700, true);
        }
        $marker = $this->doneDir . '/' . hash('sha256', $this->job->id);
        $lock = fopen($marker . '.lock', 'c');
        // Held until this method returns (or the process dies): a second run of the job waits.
        if ($lock === false || !flock($lock, LOCK_EX)) {
            throw new RuntimeException("cannot lock $marker.lock");
        }
        if (file_exists($marker)) {
            error_log(sprintf(
                'order %d: job %s already done, attempt %d skipped',
                $event->id,
                $this->job->id,
                $this->job->attempt
            ));
            return;
        }
        $this->inner->onOrderPlaced($event);   // an exception leaves no marker: a retry redoes it
        if (file_put_contents($marker, $this->job->id . "\n") === false) {
            throw new RuntimeException("cannot write $marker");
        }
    }
}

function fastworker_reject(string $why): never
{
    http_response_code(400);
    error_log('idempotent_listener.php: ' . $why);
    echo $why, "\n";
    exit;
}

$data = $_SERVER['DEFERRED_DATA'] ?? $_POST['DEFERRED_DATA'] ?? null;
if (!is_string($data) || $data === '') {
    fastworker_reject('no DEFERRED_DATA in the request');
}
$serialized = base64_decode(trim($data), true);
$event = $serialized === false
    ? false
    : @unserialize($serialized, ['allowed_classes' => FASTWORKER_DEMO_EVENT_CLASSES]);
if (!$event instanceof OrderPlaced) {
    fastworker_reject(sprintf('DEFERRED_DATA is not a serialized OrderPlaced (%d bytes)', strlen($data)));
}

$dispatcher = new Symfony\Component\EventDispatcher\EventDispatcher();
$listener = new IdempotentOrderListener(JobContext::fromServer($_SERVER));
$dispatcher->addListener(OrderPlaced::NAME, [$listener, 'onOrderPlaced']);
$dispatcher->dispatch($event, OrderPlaced::NAME);
echo "dispatched ", OrderPlaced::NAME, "\n";
