// The simulated board: the Verilated AcceleratorTop (hdl/top.py, module mmfree_top, wrapped by
// simboard_top.v), its clock, and its UART pins bridged bit-accurately to a TCP client. Built and
// started by sim/board.py.
//
// Usage: simboard (--fd FD | --port PORT) --divisor D [--clock-hz HZ] [--idle-cycles N]
//        simboard --bench CYCLES --divisor D [--clock-hz HZ]
//
//   --fd FD          a listening TCP socket inherited from the parent (sim/board.py binds it)
//   --port PORT      or bind 127.0.0.1:PORT here
//   --divisor D      clock cycles per UART bit (hdl/uart.py uart_divisor(clk_hz, baud))
//   --clock-hz HZ    the design's clock, only for the statistics (simulated seconds)
//   --idle-cycles N  sleep after N cycles in which nothing happened (default 1048576)
//   --bench CYCLES   no socket: run CYCLES cycles with an idle line, print the rate, exit
//
// Protocol with the parent: once the listening socket is ready, "ready" and a newline go to
// stdout; statistics lines ("simboard: ... cycles ...") go to stderr when a client leaves and at
// exit. One client at a time (the next is accepted after the current one disconnects); the
// design keeps its state across clients, as a powered board does.
//
// Line model (8N1, idle high): bytes from the client are serialized onto uart_rx back to back,
// D cycles per bit, LSB first; uart_tx is deserialized by sampling the middle of each bit
// (D/2 cycles after the falling edge of the start bit, then every D cycles); a byte whose stop
// bit reads 0 is dropped and counted as a framing error.
//
// Time: while a client is connected the clock runs as fast as the host allows. When nothing
// happens for --idle-cycles cycles (the design's busy output low, both lines idle, no input
// queued) the process sleeps until the client sends something (ticking 65536 cycles every
// 100 ms in case the design was still busy in a way busy does not show). Without a client it
// ticks until idle, then blocks waiting for a connection; bytes the client sent that were not
// yet on the line when it left are dropped, and what the board sends meanwhile is lost. The
// design cannot tell: only its own cycle counts are visible to the host.
//
// Exit: SIGTERM, SIGINT or SIGHUP, or the parent process dying (checked every ~100 ms), ends
// the process with status 0 after a statistics line.

#include "Vsimboard_top.h"
#include "verilated.h"

#include <arpa/inet.h>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

namespace {

volatile sig_atomic_t g_stop = 0;

void on_signal(int) { g_stop = 1; }

double clock_s(clockid_t clock) {
    timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

double now_s() { return clock_s(CLOCK_MONOTONIC); }
double cpu_s() { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

[[noreturn]] void die(const std::string &msg) {
    std::fprintf(stderr, "simboard: error: %s\n", msg.c_str());
    std::exit(2);
}

long parse_long(const char *opt, const char *text, long lo) {
    char *end = nullptr;
    errno = 0;
    long v = std::strtol(text, &end, 10);
    if (errno || !end || *end || v < lo) die(std::string("bad value for ") + opt + ": " + text);
    return v;
}

// Host → board: serializes queued bytes onto uart_rx.
struct Serializer {
    uint32_t divisor;
    std::vector<uint8_t> queue;
    size_t head = 0;
    uint32_t shift = 0;   // stop · data · start, sent LSB first
    uint32_t bits = 0;    // bits left on the line, the current one included
    uint32_t timer = 0;   // cycles left in the current bit

    bool idle() const { return bits == 0 && head == queue.size(); }
    size_t pending() const { return queue.size() - head; }

    void push(const uint8_t *data, size_t n) {
        if (head == queue.size()) {
            queue.clear();
            head = 0;
        }
        queue.insert(queue.end(), data, data + n);
    }

    void discard_queue() {
        queue.clear();
        head = 0;
    }

    // The line level for this cycle.
    inline uint8_t step() {
        if (bits == 0) {
            if (head == queue.size()) return 1;
            shift = (1u << 9) | (uint32_t(queue[head++]) << 1);
            bits = 10;
            timer = divisor;
        }
        uint8_t level = shift & 1;
        if (--timer == 0) {
            shift >>= 1;
            --bits;
            timer = divisor;
        }
        return level;
    }
};

// Board → host: deserializes uart_tx.
struct Deserializer {
    enum State { IDLE, START, DATA, STOP, BREAK };
    uint32_t divisor;
    State state = IDLE;
    uint32_t timer = 0;
    uint32_t nbits = 0;
    uint32_t shift = 0;
    uint64_t framing_errors = 0;
    std::vector<uint8_t> out;

    bool idle() const { return state == IDLE; }

    inline void step(uint8_t line) {
        switch (state) {
        case IDLE:
            if (!line) {
                state = START;
                timer = divisor / 2;
            }
            break;
        case START:
            if (--timer == 0) {
                if (!line) {
                    state = DATA;
                    timer = divisor;
                    nbits = 0;
                    shift = 0;
                } else {
                    state = IDLE;  // a glitch, not a start bit
                }
            }
            break;
        case DATA:
            if (--timer == 0) {
                shift |= uint32_t(line) << nbits;
                timer = divisor;
                if (++nbits == 8) state = STOP;
            }
            break;
        case STOP:
            if (--timer == 0) {
                if (line) {
                    out.push_back(uint8_t(shift));
                    state = IDLE;
                } else {
                    ++framing_errors;
                    state = BREAK;
                }
            }
            break;
        case BREAK:
            if (line) state = IDLE;
            break;
        }
    }
};

struct Stats {
    uint64_t cycles = 0;      // simulated cycles
    double tick_s = 0;        // wall time spent ticking (sleeps excluded)
    double cpu_s = 0;         // CPU time spent ticking (what the machine's load does not change)
    uint64_t bytes_in = 0, bytes_out = 0;
};

class Board {
public:
    Board(VerilatedContext *ctx, uint32_t divisor, uint64_t idle_limit)
        : top_(new Vsimboard_top{ctx}), idle_limit_(idle_limit) {
        ser_.divisor = des_.divisor = divisor;
        top_->uart_rx = 1;
        top_->clk = 0;
        top_->eval();
    }

    ~Board() { top_->final(); }

    // One clock cycle: drive uart_rx, rising edge, sample uart_tx, falling edge.
    inline void tick() {
        top_->uart_rx = ser_.step();
        top_->clk = 1;
        top_->eval();
        uint8_t tx = top_->uart_tx;
        des_.step(tx);
        top_->clk = 0;
        top_->eval();
        if (top_->busy || !tx || !des_.idle() || !ser_.idle())
            idle_count_ = 0;
        else
            ++idle_count_;
    }

    void run(uint32_t cycles) {
        double t0 = now_s(), c0 = cpu_s();
        for (uint32_t i = 0; i < cycles; ++i) tick();
        stats_.cycles += cycles;
        stats_.tick_s += now_s() - t0;
        stats_.cpu_s += cpu_s() - c0;
    }

    bool idle() const { return idle_count_ >= idle_limit_; }
    // After a sleep: run this many more cycles before sleeping again.
    void nearly_idle(uint64_t cycles) { idle_count_ = idle_limit_ > cycles ? idle_limit_ - cycles : 0; }

    Serializer &ser() { return ser_; }
    Deserializer &des() { return des_; }
    Stats &stats() { return stats_; }
    unsigned rx_errors() const { return top_->rx_errors; }
    unsigned rx_overruns() const { return top_->rx_overruns; }

private:
    std::unique_ptr<Vsimboard_top> top_;
    Serializer ser_;
    Deserializer des_;
    Stats stats_;
    uint64_t idle_count_ = 0;
    uint64_t idle_limit_;
};

void report(const char *when, Board &board, double clock_hz) {
    const Stats &s = board.stats();
    double rate = s.tick_s > 0 ? s.cycles / s.tick_s : 0.0;
    double cpu_rate = s.cpu_s > 0 ? s.cycles / s.cpu_s : 0.0;
    std::fprintf(stderr,
                 "simboard: %s: %llu cycles in %.3f s of ticking (%.3f s CPU): %.0f cycles/s, "
                 "%.0f per CPU second (%.3fx real time at %.0f Hz); %llu bytes in, %llu bytes out, "
                 "%llu framing errors; board UART: %u rx errors, %u rx overruns\n",
                 when, (unsigned long long)s.cycles, s.tick_s, s.cpu_s, rate, cpu_rate,
                 clock_hz > 0 ? rate / clock_hz : 0.0, clock_hz,
                 (unsigned long long)s.bytes_in, (unsigned long long)s.bytes_out,
                 (unsigned long long)board.des().framing_errors, board.rx_errors(),
                 board.rx_overruns());
    std::fflush(stderr);
}

int listen_on(long port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die(std::string("socket: ") + std::strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(uint16_t(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, reinterpret_cast<sockaddr *>(&addr), sizeof addr) < 0)
        die("cannot listen on 127.0.0.1:" + std::to_string(port) + ": " + std::strerror(errno));
    if (listen(fd, 4) < 0) die(std::string("listen: ") + std::strerror(errno));
    return fd;
}

}  // namespace

int main(int argc, char **argv) {
    long fd_arg = -1, port = -1, divisor = 0, bench = 0;
    long idle_limit = 1 << 20;
    double clock_hz = 0;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (i + 1 >= argc) die("option " + a + " needs a value");
        const char *v = argv[++i];
        if (a == "--fd") fd_arg = parse_long("--fd", v, 0);
        else if (a == "--port") port = parse_long("--port", v, 0);
        else if (a == "--divisor") divisor = parse_long("--divisor", v, 2);
        else if (a == "--clock-hz") clock_hz = double(parse_long("--clock-hz", v, 1));
        else if (a == "--idle-cycles") idle_limit = parse_long("--idle-cycles", v, 1);
        else if (a == "--bench") bench = parse_long("--bench", v, 1);
        else die("unknown option " + a);
    }
    if (divisor == 0) die("--divisor is required");
    if (!bench && (fd_arg < 0) == (port < 0)) die("give one of --fd or --port (or --bench)");

    const std::unique_ptr<VerilatedContext> ctx{new VerilatedContext};
    Board board(ctx.get(), uint32_t(divisor), uint64_t(idle_limit));

    if (bench) {
        board.run(uint32_t(bench));
        report("bench", board, clock_hz);
        return 0;
    }

    struct sigaction sa {};
    sa.sa_handler = on_signal;  // no SA_RESTART: poll() returns EINTR at once
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGHUP, &sa, nullptr);
    signal(SIGPIPE, SIG_IGN);
    const pid_t parent = getppid();

    int listener = fd_arg >= 0 ? int(fd_arg) : listen_on(port);
    std::fputs("ready\n", stdout);
    std::fflush(stdout);

    const uint32_t CHUNK = 512;         // cycles between socket checks
    const int SLEEP_MS = 100;
    int client = -1;
    std::vector<uint8_t> rxbuf(1 << 16);
    double last_parent_check = now_s();
    Serializer &ser = board.ser();
    Deserializer &des = board.des();

    auto drop_client = [&]() {
        close(client);
        client = -1;
        ser.discard_queue();
        report("client left", board, clock_hz);
    };

    while (!g_stop) {
        double t = now_s();
        if (t - last_parent_check > 0.1) {
            last_parent_check = t;
            if (getppid() != parent) break;
        }
        if (client < 0) {
            // Finish what the design is doing, then wait for a client without ticking.
            pollfd p{listener, POLLIN, 0};
            int ready = poll(&p, 1, board.idle() ? SLEEP_MS : 0);
            if (ready > 0 && (p.revents & POLLIN)) {
                client = accept(listener, nullptr, nullptr);
                if (client >= 0) {
                    int one = 1;
                    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    des.out.clear();
                }
            }
            if (client < 0) {
                if (!board.idle()) board.run(CHUNK);
                des.out.clear();  // nobody to hear it
                continue;
            }
        }

        board.run(CHUNK);

        if (!des.out.empty()) {
            ssize_t n = send(client, des.out.data(), des.out.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n > 0) {
                board.stats().bytes_out += uint64_t(n);
                des.out.erase(des.out.begin(), des.out.begin() + n);
            } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                drop_client();
                continue;
            }
        }

        int timeout = 0;
        if (board.idle() && des.out.empty()) timeout = SLEEP_MS;
        if (ser.pending() < 64 || timeout) {
            pollfd p{client, POLLIN, 0};
            int ready = poll(&p, 1, timeout);
            if (ready > 0) {
                ssize_t n = recv(client, rxbuf.data(), rxbuf.size(), MSG_DONTWAIT);
                if (n > 0) {
                    ser.push(rxbuf.data(), size_t(n));
                    board.stats().bytes_in += uint64_t(n);
                } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                    drop_client();
                    continue;
                }
            } else if (timeout) {
                board.nearly_idle(1 << 16);  // in case busy missed something: a little progress
            }
        }
    }

    if (client >= 0) close(client);
    close(listener);
    report("exit", board, clock_hz);
    return 0;
}
