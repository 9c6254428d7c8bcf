// Command goseed is the seed's Go design, the peer `just bench` measures trioagg against.
//
// As the seed describes it: Gin (release mode) takes POST /v1/events (one event object,
// a JSON array of events, or NDJSON), validates the events, puts them on a bounded
// channel and answers 202 {"accepted": N} at once, before they are committed. One
// writer goroutine per channel (-writers, default 1; an event goes to writer
// hour % writers) takes everything waiting up to -batch-size events, pre-aggregates it
// per (key, bucket, tags) in memory and commits one transaction of UPSERTs through
// go-sqlite3 (WAL, -sync full|normal). GET /v1/aggregates answers one key's buckets
// (all its series merged) from a pool of read connections. SIGTERM stops the HTTP
// server, drains the channels, commits and exits 0.
//
// Not in the seed's design and so not here: idempotency ids, sketches, tag filters.
//
// Build (Debian packages golang-go, golang-github-gin-gonic-gin-dev,
// golang-github-mattn-go-sqlite3-dev; no network):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o goseed ./bench/goseed
package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gin-gonic/gin"
	_ "github.com/mattn/go-sqlite3"
)

const bucketSeconds = 3600

const schema = `CREATE TABLE IF NOT EXISTS rollups (
    key TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    tags TEXT NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    sumsq REAL NOT NULL,
    PRIMARY KEY (key, bucket, tags)
) WITHOUT ROWID`

const upsert = `INSERT INTO rollups (key, bucket, tags, count, sum, min, max, sumsq)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key, bucket, tags) DO UPDATE SET
    count = count + excluded.count,
    sum = sum + excluded.sum,
    min = min(min, excluded.min),
    max = max(max, excluded.max),
    sumsq = sumsq + excluded.sumsq`

// event is one decoded event; Ts and Value stay raw so that both shapes of ts and an
// absent value can be told apart.
type event struct {
	Key        string            `json:"key"`
	Ts         json.RawMessage   `json:"ts"`
	Value      *float64          `json:"value"`
	Tags       map[string]string `json:"tags"`
	DistinctID string            `json:"distinct_id"`
	ID         string            `json:"id"`
}

// point is a validated event reduced to what the roll-up needs.
type point struct {
	key    string
	bucket int64
	tags   string
	value  float64
}

type rowKey struct {
	key    string
	bucket int64
	tags   string
}

type agg struct {
	count                int64
	sum, min, max, sumsq float64
}

func parseTs(raw json.RawMessage, now time.Time) (float64, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return float64(now.UnixNano()) / 1e9, nil
	}
	if raw[0] == '"' {
		var text string
		if err := json.Unmarshal(raw, &text); err != nil {
			return 0, err
		}
		t, err := time.Parse(time.RFC3339Nano, text)
		if err != nil {
			return 0, fmt.Errorf("ts: %v", err)
		}
		return float64(t.UnixNano()) / 1e9, nil
	}
	seconds, err := strconv.ParseFloat(string(raw), 64)
	if err != nil || math.IsNaN(seconds) || math.IsInf(seconds, 0) {
		return 0, errors.New("ts: not a number of seconds or an RFC 3339 string")
	}
	return seconds, nil
}

// canonicalTags renders tags in one order so that the same series gets the same row.
func canonicalTags(tags map[string]string) string {
	if len(tags) == 0 {
		return "{}"
	}
	names := make([]string, 0, len(tags))
	for name := range tags {
		names = append(names, name)
	}
	sort.Strings(names)
	var b strings.Builder
	b.WriteByte('{')
	for i, name := range names {
		if i > 0 {
			b.WriteByte(',')
		}
		n, _ := json.Marshal(name)
		v, _ := json.Marshal(tags[name])
		b.Write(n)
		b.WriteByte(':')
		b.Write(v)
	}
	b.WriteByte('}')
	return b.String()
}

func toPoint(e *event, now time.Time) (point, error) {
	if len(e.Key) == 0 || len(e.Key) > 255 {
		return point{}, errors.New("key: 1-255 bytes required")
	}
	if len(e.Tags) > 16 {
		return point{}, errors.New("tags: at most 16")
	}
	ts, err := parseTs(e.Ts, now)
	if err != nil {
		return point{}, err
	}
	if ts > float64(now.Unix())+3600 {
		return point{}, errors.New("ts: more than 1 h in the future")
	}
	value := 1.0
	if e.Value != nil {
		value = *e.Value
	}
	bucket := int64(math.Floor(ts/bucketSeconds)) * bucketSeconds
	return point{e.Key, bucket, canonicalTags(e.Tags), value}, nil
}

// decode reads a body as NDJSON, a JSON array or one object; any invalid event fails it all.
func decode(body []byte, ndjson bool) ([]point, error) {
	now := time.Now()
	var events []event
	switch {
	case ndjson:
		scanner := bufio.NewScanner(bytes.NewReader(body))
		scanner.Buffer(make([]byte, 64*1024), len(body)+1)
		for scanner.Scan() {
			line := bytes.TrimSpace(scanner.Bytes())
			if len(line) == 0 {
				continue
			}
			var e event
			if err := json.Unmarshal(line, &e); err != nil {
				return nil, err
			}
			events = append(events, e)
		}
		if err := scanner.Err(); err != nil {
			return nil, err
		}
	case len(bytes.TrimSpace(body)) > 0 && bytes.TrimSpace(body)[0] == '[':
		if err := json.Unmarshal(body, &events); err != nil {
			return nil, err
		}
	default:
		var e event
		if err := json.Unmarshal(body, &e); err != nil {
			return nil, err
		}
		events = []event{e}
	}
	if len(events) == 0 || len(events) > 10000 {
		return nil, errors.New("1-10,000 events per request")
	}
	points := make([]point, len(events))
	for i := range events {
		p, err := toPoint(&events[i], now)
		if err != nil {
			return nil, fmt.Errorf("event %d: %v", i, err)
		}
		points[i] = p
	}
	return points, nil
}

// writer drains its channel: everything waiting up to batchSize events, aggregated, one commit.
func writer(db *sql.DB, in <-chan []point, batchSize int, done *sync.WaitGroup) {
	defer done.Done()
	for first := range in {
		pending := map[rowKey]*agg{}
		events := 0
		add := func(points []point) {
			for _, p := range points {
				k := rowKey{p.key, p.bucket, p.tags}
				a := pending[k]
				if a == nil {
					pending[k] = &agg{1, p.value, p.value, p.value, p.value * p.value}
				} else {
					a.count++
					a.sum += p.value
					a.min = math.Min(a.min, p.value)
					a.max = math.Max(a.max, p.value)
					a.sumsq += p.value * p.value
				}
			}
			events += len(points)
		}
		add(first)
	more:
		for events < batchSize {
			select {
			case points, ok := <-in:
				if !ok {
					break more
				}
				add(points)
			default:
				break more
			}
		}
		if err := commit(db, pending); err != nil {
			log.Fatalf("commit failed: %v", err)
		}
	}
}

func commit(db *sql.DB, pending map[rowKey]*agg) error {
	tx, err := db.Begin()
	if err != nil {
		return err
	}
	stmt, err := tx.Prepare(upsert)
	if err != nil {
		tx.Rollback()
		return err
	}
	for k, a := range pending {
		if _, err := stmt.Exec(k.key, k.bucket, k.tags, a.count, a.sum, a.min, a.max, a.sumsq); err != nil {
			stmt.Close()
			tx.Rollback()
			return err
		}
	}
	stmt.Close()
	return tx.Commit()
}

func parseTime(text string, fallback int64) (int64, error) {
	if text == "" {
		return fallback, nil
	}
	if seconds, err := strconv.ParseFloat(text, 64); err == nil {
		return int64(math.Floor(seconds)), nil
	}
	t, err := time.Parse(time.RFC3339Nano, text)
	if err != nil {
		return 0, err
	}
	return t.Unix(), nil
}

func rfc3339(seconds int64) string {
	return time.Unix(seconds, 0).UTC().Format("2006-01-02T15:04:05Z")
}

type bucketOut struct {
	Start string  `json:"start"`
	Count int64   `json:"count"`
	Sum   float64 `json:"sum"`
	Min   float64 `json:"min"`
	Max   float64 `json:"max"`
	Avg   float64 `json:"avg"`
}

func main() {
	dbPath := flag.String("db", "goseed.db", "SQLite file")
	addr := flag.String("addr", "127.0.0.1:8000", "address to listen on (port 0 picks one)")
	batchSize := flag.Int("batch-size", 10000, "most events one transaction commits")
	queueSize := flag.Int("queue-size", 1024, "requests each writer's channel holds")
	writers := flag.Int("writers", 1, "writer goroutines; an event goes to hour % writers")
	syncMode := flag.String("sync", "full", "SQLite synchronous mode: full or normal")
	flag.Parse()
	if *syncMode != "full" && *syncMode != "normal" {
		log.Fatalf("-sync must be full or normal")
	}
	dsn := fmt.Sprintf("file:%s?_journal_mode=WAL&_synchronous=%s&_busy_timeout=10000", *dbPath, strings.ToUpper(*syncMode))
	writeDB, err := sql.Open("sqlite3", dsn+"&_txlock=immediate")
	if err != nil {
		log.Fatal(err)
	}
	writeDB.SetMaxOpenConns(*writers)
	if _, err := writeDB.Exec(schema); err != nil {
		log.Fatal(err)
	}
	readDB, err := sql.Open("sqlite3", dsn)
	if err != nil {
		log.Fatal(err)
	}
	readDB.SetMaxOpenConns(8)
	readDB.SetMaxIdleConns(8)

	channels := make([]chan []point, *writers)
	var drained sync.WaitGroup
	for i := range channels {
		channels[i] = make(chan []point, *queueSize)
		drained.Add(1)
		go writer(writeDB, channels[i], *batchSize, &drained)
	}

	gin.SetMode(gin.ReleaseMode)
	router := gin.New()
	router.Use(gin.Recovery())
	router.POST("/v1/events", func(c *gin.Context) {
		body, err := io.ReadAll(io.LimitReader(c.Request.Body, 10<<20+1))
		if err != nil || len(body) > 10<<20 {
			c.JSON(http.StatusRequestEntityTooLarge, gin.H{"error": "body over 10 MiB"})
			return
		}
		ndjson := strings.HasPrefix(c.ContentType(), "application/x-ndjson")
		points, err := decode(body, ndjson)
		if err != nil {
			c.JSON(http.StatusUnprocessableEntity, gin.H{"error": err.Error()})
			return
		}
		if *writers == 1 {
			channels[0] <- points
		} else {
			shards := make([][]point, *writers)
			for _, p := range points {
				n := (p.bucket / bucketSeconds) % int64(*writers)
				shards[n] = append(shards[n], p)
			}
			for n, shard := range shards {
				if len(shard) > 0 {
					channels[n] <- shard
				}
			}
		}
		c.JSON(http.StatusAccepted, gin.H{"accepted": len(points)})
	})
	router.GET("/v1/aggregates", func(c *gin.Context) {
		key := c.Query("key")
		now := time.Now().Unix() / bucketSeconds * bucketSeconds
		end, err1 := parseTime(c.Query("to"), now)
		start, err2 := parseTime(c.Query("from"), end-86400)
		if key == "" || err1 != nil || err2 != nil {
			c.JSON(http.StatusUnprocessableEntity, gin.H{"error": "key, from and to"})
			return
		}
		start = start / bucketSeconds * bucketSeconds
		end = end / bucketSeconds * bucketSeconds
		rows, err := readDB.Query(`SELECT bucket, sum(count), sum(sum), min(min), max(max)
			FROM rollups WHERE key = ? AND bucket >= ? AND bucket < ?
			GROUP BY bucket ORDER BY bucket`, key, start, end)
		if err != nil {
			c.JSON(http.StatusServiceUnavailable, gin.H{"error": err.Error()})
			return
		}
		defer rows.Close()
		buckets := []bucketOut{}
		for rows.Next() {
			var bucket, count int64
			var sum, min, max float64
			if err := rows.Scan(&bucket, &count, &sum, &min, &max); err != nil {
				c.JSON(http.StatusServiceUnavailable, gin.H{"error": err.Error()})
				return
			}
			buckets = append(buckets, bucketOut{rfc3339(bucket), count, sum, min, max, sum / float64(count)})
		}
		answerJSON(c, http.StatusOK, gin.H{
			"from": rfc3339(start), "to": rfc3339(end), "granularity": "hour", "tz": "UTC",
			"results": []gin.H{{"key": key, "tags": gin.H{}, "buckets": buckets}},
		})
	})
	router.GET("/readyz", func(c *gin.Context) { c.JSON(http.StatusOK, gin.H{"status": "ready"}) })

	listener, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	server := &http.Server{Handler: router}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	fmt.Printf("Running on http://%s (CTRL + C to quit)\n", listener.Addr())
	select {
	case <-stop:
	case err := <-served:
		log.Fatal(err)
	}
	// stop taking requests, let the handlers in flight enqueue, then drain every channel
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := server.Shutdown(ctx); err != nil {
		log.Fatal(err)
	}
	began := time.Now()
	for _, ch := range channels {
		close(ch)
	}
	drained.Wait()
	if err := writeDB.Close(); err != nil {
		log.Fatal(err)
	}
	readDB.Close()
	fmt.Printf("drained in %.3f s\n", time.Since(began).Seconds())
}

// answerJSON sends v with a Content-Length, as trioagg and the ceiling do: c.JSON streams
// an answer over 2 KiB (net/http's buffer) with chunked encoding, which the bench's load
// generator, reading only Content-Length, does not take.
func answerJSON(c *gin.Context, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		c.JSON(http.StatusInternalServerError, gin.H{"error": err.Error()})
		return
	}
	c.Header("Content-Length", strconv.Itoa(len(body)))
	c.Data(status, "application/json; charset=utf-8", body)
}
