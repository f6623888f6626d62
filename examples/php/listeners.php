<?php
// The example application: one event class and one listener, wired to Symfony's EventDispatcher.
// dispatch.php (run by PHP-FPM for each job) and publish.php (the producer) both include this
// file, so both sides agree on the event class.
//
// The listener appends "<id> <strlen(payload)> <pid>" to FASTWORKER_DEMO_LOG (default
// /tmp/fastworker-demo.log) and throws when the payload starts with "FAIL", so a demo can show
// failed jobs as well as exactly-once delivery.

declare(strict_types=1);

// Debian's php-symfony-event-dispatcher (5.4); its autoloader also loads the contracts.
require_once '/usr/share/php/Symfony/Component/EventDispatcher/autoload.php';

use Symfony\Component\EventDispatcher\EventDispatcher;
use Symfony\Contracts\EventDispatcher\Event;

final class OrderPlaced extends Event
{
    public const NAME = 'order.placed';

    public int $id;
    public string $payload;

    public function __construct(int $id, string $payload)
    {
        $this->id = $id;
        $this->payload = $payload;
    }

    // The bundle's dispatch command dispatches under $event->getName().
    public function getName(): string
    {
        return self::NAME;
    }
}

final class OrderLogListener
{
    private string $logFile;

    public function __construct(?string $logFile = null)
    {
        $env = getenv('FASTWORKER_DEMO_LOG', true);
        $this->logFile = $logFile ?? (($env !== false && $env !== '') ? $env : '/tmp/fastworker-demo.log');
    }

    public function onOrderPlaced(OrderPlaced $event): void
    {
        if (strncmp($event->payload, 'FAIL', 4) === 0) {
            throw new RuntimeException(sprintf(
                'order %d failed: payload starts with FAIL (%d bytes)',
                $event->id,
                strlen($event->payload)
            ));
        }
        $line = sprintf("%d %d %d\n", $event->id, strlen($event->payload), getmypid());
        if (file_put_contents($this->logFile, $line, FILE_APPEND | LOCK_EX) === false) {
            throw new RuntimeException("order {$event->id} failed: cannot write {$this->logFile}");
        }
    }
}

// Classes unserialize() may create from a job: anything else is refused (a job's data must never
// instantiate arbitrary classes).
const FASTWORKER_DEMO_EVENT_CLASSES = [OrderPlaced::class];

function fastworker_demo_dispatcher(): EventDispatcher
{
    $dispatcher = new EventDispatcher();
    $dispatcher->addListener(OrderPlaced::NAME, [new OrderLogListener(), 'onOrderPlaced']);
    return $dispatcher;
}
